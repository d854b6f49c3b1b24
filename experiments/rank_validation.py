"""Do the transferability scores pick the freeze depth that fine-tuning found best?

    .venv/bin/tlflax rank --config configs/rank_hymenoptera.py --output workdirs/rank_hymenoptera
    .venv/bin/python experiments/rank_validation.py workdirs/rank_hymenoptera \\
        efficientnet_lite0.tf_in1k=workdirs/hymenoptera \\
        cifar_resnet56=workdirs/cifar_to_ants --out workdirs/rank_validation.md

Each `SOURCE=SWEEP_WORKDIR` pairs a ranked source (its label in scores.csv,
or the model name of a `MODEL=PATH` source) with a finished sweep that
fine-tuned it on the same target with freeze rules (`freeze.rules`). The
sweep's points that start from that source's weights, with no staged recipe
and with augmentation where the sweep has both (`configs/hymenoptera.py`'s
frozen_head rather than its cached probe), give each freeze rule its
accuracies over seeds (the validation split); the scores were computed on
the training split alone.

Writes one markdown table per source: for each score, the weighted Kendall
tau and Pearson correlation with the mean accuracy, whether its pick is
within one standard error of the best swept rule, and the ranking's cost as
a share of the sweep's (the seconds of the features and scores of every
candidate of the source, against the summed run time of the sweep's runs
from that source that the table uses).
"""

from __future__ import annotations

import argparse
import collections
import csv
import math
import os
import sys

import numpy as np

from tlflax.inference import ranking
from tlflax.sweeps import results


def read_scores(path: str) -> list[ranking.ScoreRow]:
  """scores.csv back as ScoreRows."""
  rows = []
  with open(path, newline="", encoding="utf-8") as f:
    for r in csv.DictReader(f):
      source = ranking.Source(r["model"], r["weights"])
      candidate = ranking.Candidate(source, r["stage"], r["freeze_rule"])
      value = float(r["value"]) if r["value"] else math.nan
      rows.append(ranking.ScoreRow(candidate, r["score"], value, float(r["seconds"]),
                                   float(r["feature_seconds"])))
  return rows


def swept_accuracy(workdir: str, weights_match) -> tuple[dict[str, list[float]], float]:
  """{freeze rule: accuracies over seeds} of the sweep's runs from the source, and their seconds."""
  by_rule = collections.defaultdict(list)
  augmented = collections.defaultdict(list)
  seconds = 0.0
  for row in results.collect(workdir):
    settings = row.settings
    if settings.get("recipe") or settings.get("stages") or not weights_match(
        settings.get("init.weights") or ""):
      continue
    seconds += row.wall_seconds
    rule = settings.get("freeze.rules") or "none"
    by_rule[rule].append(row.accuracy)
    if settings.get("data.augment", "none") != "none":
      augmented[rule].append(row.accuracy)
  # Where a rule ran with and without augmentation, keep the augmented runs
  # (the depth recipes augment, so they compare on the same footing).
  return {rule: augmented.get(rule) or values for rule, values in by_rule.items()}, seconds


def _matcher(label: str):
  if "=" not in label and "." in label:  # a pretrained id
    return lambda weights: weights == label
  model = label.split("=")[0]
  return lambda weights: bool(weights) and (model in weights or os.path.basename(weights) in label)


def table(rows, label: str, workdir: str) -> str:
  """The markdown table of one source against its sweep."""
  own = [r for r in rows if r.candidate.source.label == label
         or r.candidate.source.model == label]
  if not own:
    raise SystemExit(f"scores.csv has no source {label!r}; it has "
                     f"{sorted({r.candidate.source.label for r in rows})}")
  accuracy, sweep_seconds = swept_accuracy(workdir, _matcher(own[0].candidate.source.label))
  keyed = {(own[0].candidate.source.label, rule): values for rule, values in accuracy.items()}
  agreements = ranking.compare_with_sweep(own, keyed)
  ranked_rules = {r.candidate.freeze_rule for r in own}
  matched = sorted(rule for rule in accuracy if rule in ranked_rules)
  lines = [f"### {own[0].candidate.source.label} against {workdir}", "",
           "Fine-tuned accuracy per freeze rule (mean ± sd over seeds): " + "; ".join(
               f"{rule} {100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1):.1f} (n={len(v)})"
               for rule, v in sorted(accuracy.items())),
           f"Rules both ranked and fine-tuned: {', '.join(matched)}.", ""]
  if not agreements:
    lines.append("Fewer than three rules both ranked and fine-tuned: no correlation reported.")
    return "\n".join(lines)
  lines += ["| score | rules | weighted tau | Pearson | pick | pick within 1 s.e. of best | "
            "ranking cost / sweep cost |", "|---|---|---|---|---|---|---|"]
  for a in agreements:
    # Each stage's features once (every score of a candidate reads the same), plus the scores.
    features = {r.candidate: r.feature_seconds for r in own if r.score == a.score}
    cost = sum(features.values()) + sum(r.seconds for r in own if r.score == a.score)
    lines.append(f"| {a.score} | {a.candidates} | {a.weighted_tau:+.2f} | {a.pearson:+.2f} | "
                 f"{a.pick.freeze_rule} ({a.pick.stage}) | {'yes' if a.pick_within_one_se else 'no'}"
                 f" | {100 * cost / sweep_seconds:.3f}% |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("rank_output", help="the --output of tlflax rank")
  parser.add_argument("pairs", nargs="+", help="SOURCE=SWEEP_WORKDIR")
  parser.add_argument("--out", default="", help="markdown file to write (default: print only)")
  args = parser.parse_args(argv)
  rows = read_scores(os.path.join(args.rank_output, ranking.CSV_FILE))
  parts = []
  for pair in args.pairs:
    if "=" not in pair:
      parser.error(f"{pair!r}: write SOURCE=SWEEP_WORKDIR")
    label, workdir = pair.rsplit("=", 1)
    parts.append(table(rows, label, workdir))
  text = "\n\n".join(parts) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
