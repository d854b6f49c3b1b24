"""tlflax's hymenoptera study beside PyTorch's: one markdown table.

    .venv/bin/tlflax train --config configs/hymenoptera.py --workdir workdirs/hymenoptera
    .venv/bin/python experiments/hymenoptera_pytorch.py --out workdirs/hymenoptera_pytorch.json
    .venv/bin/python experiments/hymenoptera_table.py workdirs/hymenoptera \
        workdirs/hymenoptera_pytorch.json

One row per recipe of configs/hymenoptera.py: validation accuracy (%) as mean
± sample sd over the seeds in each framework, their difference in standard
errors (difference / sqrt(sd_a^2 / n_a + sd_b^2 / n_b)), and the speed of a
training epoch in each: the median over the run's 7-step windows (an epoch),
the first window left out (tlflax compiles there, PyTorch starts its
workers), then the median over seeds. Wall time per run (compilation, weight
loading, feature extraction and evaluation included) in the last columns.
Every recipe needs all its seeds finished in both; a missing one is an error
that names it, never a shorter row. `--timing_seeds 5-9` takes the speed
columns from those seeds alone (e.g. the runs made while nothing else ran on
the machine); accuracy always uses every seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
from hymenoptera_pytorch import load_study_config  # pylint: disable=wrong-import-position


def mean_sd(values):
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def window_seconds(step_seconds, steps_per_window):
  """Mean step time of each full window of consecutive steps, times the window."""
  windows = [step_seconds[i:i + steps_per_window]
             for i in range(0, len(step_seconds) - steps_per_window + 1, steps_per_window)]
  return [sum(w) for w in windows]


def epoch_seconds(windows):
  """Median epoch time, the first window (compilation / start-up) left out."""
  return statistics.median(windows[1:] if len(windows) > 1 else windows)


def tlflax_runs(workdir, study, recipe):
  """[(accuracy, epoch seconds, wall seconds)] of the recipe's seeds."""
  runs = []
  for seed in study.SEEDS:
    point = os.path.join(workdir, f"{recipe}__seed-{seed}")
    result_path = os.path.join(point, "result.json")
    if not os.path.exists(result_path):
      raise SystemExit(f"{result_path} is missing: point {recipe}__seed-{seed} has not "
                       f"finished; run the sweep (tlflax train --config configs/hymenoptera.py "
                       f"--workdir {workdir}) until every point has.")
    with open(result_path) as f:
      result = json.load(f)
    windows = []
    with open(os.path.join(point, "metrics.jsonl")) as f:
      for line in f:
        record = json.loads(line)
        if record.get("split") == "train" and "images_per_second" in record:
          windows.append(study.STEPS_PER_EPOCH * study.BATCH_SIZE / record["images_per_second"])
    runs.append((result["metrics"]["eval/accuracy"], epoch_seconds(windows),
                 result["wall_seconds"]))
  return runs


def pytorch_runs(results, study, recipe):
  row = results.get(recipe)
  missing = [s for s in study.SEEDS if row is None or s not in row["seeds"]]
  if missing:
    raise SystemExit(f"PyTorch's {recipe} lacks seeds {missing}; run "
                     "experiments/hymenoptera_pytorch.py with the same --out until it has them.")
  runs = []
  for seed in study.SEEDS:
    k = row["seeds"].index(seed)
    windows = window_seconds(row["step_seconds"][k], study.STEPS_PER_EPOCH)
    runs.append((row["accuracy"][k], epoch_seconds(windows), row["wall_seconds"][k]))
  return runs


def seed_range(text: str) -> list[int]:
  """"5-9" or "0,2,4" as a list of seeds."""
  seeds = []
  for part in text.split(","):
    first, _, last = part.partition("-")
    seeds += list(range(int(first), int(last or first) + 1))
  return seeds


def table(workdir, pytorch_json, timing_seeds=None) -> str:
  study = load_study_config()
  timed = [k for k, seed in enumerate(study.SEEDS) if timing_seeds is None or seed in timing_seeds]
  if not timed:
    raise SystemExit(f"--timing_seeds {timing_seeds} names none of the study's seeds "
                     f"{list(study.SEEDS)}.")
  with open(pytorch_json) as f:
    pytorch = json.load(f)
  lines = ["| recipe | tlflax accuracy % | PyTorch accuracy % | difference / s.e. "
           "| s/epoch tlflax | s/epoch PyTorch | s/run tlflax | s/run PyTorch |",
           "|---|---|---|---|---|---|---|---|"]
  for recipe in study.RECIPES:
    ours, theirs = tlflax_runs(workdir, study, recipe), pytorch_runs(pytorch, study, recipe)
    (m1, s1), (m2, s2) = (mean_sd([100 * r[0] for r in runs]) for runs in (ours, theirs))
    error = (s1 ** 2 / len(ours) + s2 ** 2 / len(theirs)) ** 0.5
    gap = f"{(m1 - m2) / error:+.1f}" if error > 0 else ("0" if m1 == m2 else "inf")
    speed = [statistics.median(runs[k][1] for k in timed) for runs in (ours, theirs)]
    # Run times not known (a point whose result.json was written again) are left out.
    wall = [statistics.median([runs[k][2] for k in timed if runs[k][2] is not None] or
                              [math.nan]) for runs in (ours, theirs)]
    lines.append(f"| {recipe} | {m1:.1f} ± {s1:.1f} | {m2:.1f} ± {s2:.1f} | {gap} "
                 f"| {speed[0]:.2f} | {speed[1]:.2f} | {wall[0]:.0f} | {wall[1]:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir", help="the sweep's workdir (tlflax train --workdir)")
  parser.add_argument("pytorch_json", help="experiments/hymenoptera_pytorch.py's --out file")
  parser.add_argument("--out", default="", help="also write the table to this file")
  parser.add_argument("--timing_seeds", default="", help="seeds whose runs give the speed "
                      "columns, e.g. 5-9 (default: all)")
  args = parser.parse_args(argv)
  text = table(args.workdir, args.pytorch_json,
               seed_range(args.timing_seeds) if args.timing_seeds else None)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
