"""Rank (source weights, stage) candidates for a target task before fine-tuning any of them.

    tlflax rank --config configs/rank_hymenoptera.py --output workdirs/rank_hymenoptera

Each candidate is a source network (a pretrained id, or `MODEL=PATH` for a
weight file or tlflax checkpoint) cut at one of its stages. Its features on
the target's training split are extracted once (`tlflax.inference.features`,
kept in `OUTPUT/features/<source>/<stage>/`, reused by a later call with the
same extraction) and scored by the transferability scores of
`tlflax.transferability`: the higher, the better the predicted transfer.
LEEP and NCE read the source network's own classifier on the whole network,
so they score each source's `pre_logits` candidate only.

Only `config.data.train_split` is read, never the evaluation split: the scores
predict what fine-tuning will reach on data they have not seen.
(`data.train_examples_per_class` subsamples it, as training does.)

A stage maps to the freeze rule it stands for: the stem and the stages up to
it frozen and the rest fine-tuned (`depth:K`), `pre_logits` everything frozen
under a new head (`linear_probe`). `compare_with_sweep` checks a ranking
against the accuracies a sweep measured with those rules.

Writes `OUTPUT/scores.csv` (one row per candidate and score), `OUTPUT/ranking.md`
(a ranked table per score and each score's pick), `OUTPUT/ranking.json` (the
picks and each score's time) and `OUTPUT/ranking.png` (each score over the
stages, one line per source).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import os
import re
import time
from typing import Sequence

import numpy as np
from scipy import special

from tlflax import build, files, models, transferability
from tlflax.models.base import LOGITS
from tlflax.inference import features as feature_files
from tlflax.weights import loader as weight_sources
from tlflax.weights import registry

log = logging.getLogger(__name__)

ALL = "all"
CSV_FILE = "scores.csv"
TABLE_FILE = "ranking.md"
PLOT_FILE = "ranking.png"


class RankError(ValueError):
  """A ranking that cannot be made as asked: the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A source network: its tlflax model name and its weights (an id, a file or a checkpoint).

  Attributes:
    model: the tlflax model name.
    weights: a pretrained id, a weight file or a tlflax checkpoint directory.
    framework: the file's framework ("torchvision", "timm", "keras" or
      "tlflax"; "" for an id or a tlflax checkpoint, which say it themselves).
  """
  model: str
  weights: str
  framework: str = ""

  @property
  def label(self) -> str:
    """A short name: the id, or the model and the file's name."""
    if registry.is_known(self.weights):
      return self.weights
    return f"{self.model}={os.path.basename(os.path.normpath(self.weights))}"


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A source cut at `stage`, and the freeze rule that choice stands for."""
  source: Source
  stage: str
  freeze_rule: str

  @property
  def label(self) -> str:
    return f"{self.source.label} @ {self.stage}"


@dataclasses.dataclass(frozen=True)
class ScoreRow:
  """One score of one candidate (`value` is NaN where the score does not apply).

  Attributes:
    candidate: the source and stage.
    score: the score's name (`tlflax.transferability.SCORES`).
    value: the score; higher predicts better transfer.
    seconds: computing the score from the features.
    feature_seconds: extracting the features the score reads (the
      candidate's own, plus the source's logits for LEEP and NCE), as
      measured when they were written: each stage's share of the one pass
      over the images that extracted all of its source's stages.
  """
  candidate: Candidate
  score: str
  value: float
  seconds: float
  feature_seconds: float = 0.0


def parse_sources(text: str) -> list[Source]:
  """`config.rank.sources` as Sources.

  Args:
    text: comma-separated entries, each a pretrained id
      ("efficientnet_lite0.tf_in1k") or `MODEL=[FRAMEWORK:]PATH`: a weight
      file of FRAMEWORK (torchvision, timm, keras; it may be left out for a
      file the registry knows by its name, e.g. a torchvision download) or a
      tlflax checkpoint directory.

  Returns:
    The sources, in the order given, without repeats.

  Raises:
    RankError: no sources, an unknown id, an unknown model, a missing file.
  """
  entries = [e.strip() for e in text.split(",") if e.strip()]
  if not entries:
    raise RankError("config.rank.sources is empty: name the source weights to rank, e.g. "
                    "--config.rank.sources=efficientnet_lite0.tf_in1k,"
                    "cifar_resnet56=torchvision:/path/to/weights.th")
  sources = []
  for entry in entries:
    if "=" in entry:
      model, path = (part.strip() for part in entry.split("=", 1))
      framework = ""
      prefix = path.split(":", 1)[0]
      if ":" in path and prefix in weight_sources.SOURCES:
        framework, path = prefix, path.split(":", 1)[1]
      if model not in models.model_names():
        raise RankError(f"{entry!r}: {model!r} is no tlflax model; write MODEL=PATH with one "
                        f"of tlflax.models.model_names().")
      if not os.path.exists(path):
        raise RankError(f"{entry!r}: {path} does not exist.")
      if not framework and os.path.isfile(path):
        known = registry.matching_entry(model, path)
        if known is None:
          raise RankError(
              f"{entry!r}: say which framework wrote {os.path.basename(path)}: "
              f"{model}=FRAMEWORK:{path} with FRAMEWORK one of "
              f"{', '.join(s for s in weight_sources.SOURCES if s != 'tlflax')}.")
        framework = known.source
      source = Source(model, path, framework)
    elif registry.is_known(entry):
      source = Source(registry.get(entry).model_name, entry)
    else:
      raise RankError(f"{entry!r} is no known pretrained id (tlflax.weights.registry.list_ids()); "
                      "for a file write MODEL=PATH, e.g. cifar_resnet56=resnet56-4bfd9763.th.")
    if source not in sources:
      sources.append(source)
  return sources


def freeze_rule_for(stage_names: Sequence[str], stage: str) -> str:
  """The freeze rule (`tlflax.freeze.rules_from_spec`) that features of `stage` stand for.

  Example:
    >>> freeze_rule_for(("stem", "stage1", "stage2", "stage3"), "stage2")
    'depth:2'
    >>> freeze_rule_for(("stem", "stage1", "stage2", "stage3"), "pre_logits")
    'linear_probe'
  """
  if stage == models.PRE_LOGITS:
    return "linear_probe"
  body = [s for s in stage_names if s != "stem"]
  if stage == "stem":
    return "depth:0"
  if stage not in body:
    raise RankError(f"{stage!r} is no stage of this model; it has {list(stage_names)} and "
                    f"{models.PRE_LOGITS}.")
  depth = body.index(stage) + 1
  return "linear_probe" if depth == len(body) else f"depth:{depth}"


def make_candidates(sources: Sequence[Source], stages: str) -> list[Candidate]:
  """Every source at every requested stage.

  Args:
    sources: from `parse_sources`.
    stages: "all" (each source's stem, its stages but the last, and
      pre_logits, which pools the last) or comma-separated names; each named
      stage must exist in every source.

  Raises:
    RankError: a stage some source lacks (the message lists its stages).
  """
  wanted = [s.strip() for s in stages.split(",") if s.strip()]
  if not wanted:
    raise RankError("config.rank.stages is empty: use 'all' or stage names such as "
                    "'stage2,stage4,pre_logits'.")
  out = []
  for source in sources:
    model = models.get_model(source.model)
    names = [n for n in models.feature_names(model) if n != LOGITS]
    # "all": the last stage stands for the same rule as pre_logits (all frozen, a
    # new head on the pooled features), and pooled they are the same numbers.
    chosen = [n for n in names if n != model.stage_names[-1]] if wanted == [ALL] else wanted
    missing = [s for s in chosen if s not in names]
    if missing:
      raise RankError(f"{source.label} has no stage {', '.join(map(repr, missing))}; its "
                      f"stages are {', '.join(names)} (or use 'all').")
    for stage in chosen:
      out.append(Candidate(source, stage, freeze_rule_for(model.stage_names, stage)))
  return out


def _source_config(config, source: Source):
  cfg = copy.deepcopy(config)
  cfg.model.name = source.model
  cfg.init.weights = source.weights
  cfg.init.source = source.framework
  return cfg


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _has_classifier(config, source: Source, head_scores: Sequence[str]) -> bool:
  if build.source_class_names(_source_config(config, source)) is None:
    log.warning("%s carries no known classifier: %s left out for it.", source.label,
                ", ".join(head_scores))
    return False
  return True


def _feature_directory(output: str, source: Source, stage: str) -> str:
  return os.path.join(output, "features", _slug(source.label), stage)


def _train_features(config, source: Source, stage: str, output: str, progress: bool):
  """The stage's train features (written by `rank`'s pass, or extracted now), and their cost."""
  directory = _feature_directory(output, source, stage)
  info = feature_files.extract_to_directory(_source_config(config, source), directory, stage,
                                            splits=["train"], progress=progress, reuse=True)
  values, labels = feature_files.load(directory, "train")
  return values, labels, float(info["splits"]["train"].get("seconds", math.nan))


def score_names(text: str) -> list[str]:
  """`config.rank.scores` as names of `tlflax.transferability.SCORES`."""
  names = list(transferability.SCORES) if text.strip() == ALL else [
      s.strip() for s in text.split(",") if s.strip()]
  unknown = [n for n in names if n not in transferability.SCORES]
  if unknown or not names:
    raise RankError(f"Unknown scores {unknown}; config.rank.scores takes 'all' or names from "
                    f"{', '.join(transferability.SCORES)}.")
  return names


def rank(config, output: str, progress: bool = True) -> list[ScoreRow]:
  """Scores every candidate of `config.rank` on the training split of `config.data`.

  Args:
    config: a tlflax config: `data` is the target, `rank` names the
      candidates and scores (see `tlflax.defaults.base_config`).
    output: the directory for the feature cache, `scores.csv`, `ranking.md`
      and `ranking.png`.
    progress: show progress bars.

  Returns:
    One ScoreRow per candidate and score.
  """
  sources = parse_sources(config.rank.sources)
  candidates = make_candidates(sources, config.rank.stages)
  names = score_names(config.rank.scores)
  head_scores = [n for n in names if transferability.SCORES[n].needs == "source_probabilities"]
  feature_scores = [n for n in names if n not in head_scores]
  rows = []
  with_head = [source for source in sources if head_scores and _has_classifier(config, source,
                                                                                 head_scores)]
  # Every stage a source needs, in one pass over the images (one compiled network).
  for source in sources:
    stages = [c.stage for c in candidates if c.source == source]
    stages += [LOGITS] if source in with_head else []
    feature_files.extract_to_directories(
        _source_config(config, source),
        {stage: _feature_directory(output, source, stage) for stage in stages},
        splits=["train"], progress=progress, reuse=True)
  probabilities, logit_seconds = {}, {}
  for source in with_head:
    logits, _, logit_seconds[source] = _train_features(config, source, LOGITS, output, progress)
    probabilities[source] = special.softmax(np.asarray(logits, np.float64), axis=1)
  for candidate in candidates:
    values, labels, feature_seconds = _train_features(config, candidate.source, candidate.stage,
                                                      output, progress)
    folds = {"folds": int(config.rank.folds), "seed": int(config.seed)}
    scored = transferability.compute_scores(
        feature_scores, features=values, labels=labels,
        options={"knn_accuracy": folds, "linear_probe_accuracy": folds}) if feature_scores else {}
    source_probabilities = probabilities.get(candidate.source)
    if head_scores and source_probabilities is not None and candidate.stage == models.PRE_LOGITS:
      scored.update(transferability.compute_scores(
          head_scores, labels=labels, source_probabilities=source_probabilities))
    for name in names:
      value, seconds = scored.get(name, (math.nan, 0.0))
      extra = logit_seconds.get(candidate.source, 0.0) if name in head_scores else 0.0
      rows.append(ScoreRow(candidate, name, float(value), float(seconds),
                           feature_seconds + extra if not math.isnan(value) else 0.0))
  os.makedirs(output, exist_ok=True)
  write_csv(rows, os.path.join(output, CSV_FILE))
  with open(os.path.join(output, TABLE_FILE), "w", encoding="utf-8") as f:
    f.write(markdown_tables(rows) + "\n")
  plot(rows, os.path.join(output, PLOT_FILE), title=_plot_title(config))
  write_report(rows, output)
  return rows


def _plot_title(config) -> str:
  target = config.data.path or config.data.name or config.data.source
  per_class = int(config.data.get("train_examples_per_class", 0) or 0)
  size = f", {per_class} per class" if per_class else ""
  return (f"Transferability to {os.path.basename(os.path.normpath(target))}{size} "
          f"({config.data.train_split} split, {config.data.image_size} px)")


def best_by_score(rows: Sequence[ScoreRow]) -> dict[str, Candidate]:
  """Each score's top candidate (scores that apply to no candidate are left out)."""
  best = {}
  for name in dict.fromkeys(r.score for r in rows):
    scored = [r for r in rows if r.score == name and not math.isnan(r.value)]
    if scored:
      best[name] = max(scored, key=lambda r: r.value).candidate
  return best


def markdown_tables(rows: Sequence[ScoreRow]) -> str:
  """A ranked table per score, and each score's pick (source and freeze rule)."""
  parts = []
  for name in dict.fromkeys(r.score for r in rows):
    scored = sorted((r for r in rows if r.score == name and not math.isnan(r.value)),
                    key=lambda r: -r.value)
    if not scored:
      continue
    seconds = sum(r.seconds for r in scored)
    parts.append(f"### {name} ({seconds:.2f} s for {len(scored)} candidates)\n")
    parts.append("| rank | source | stage | freeze rule | score |")
    parts.append("|---|---|---|---|---|")
    for k, r in enumerate(scored, 1):
      parts.append(f"| {k} | {r.candidate.source.label} | {r.candidate.stage} | "
                   f"{r.candidate.freeze_rule} | {r.value:.4g} |")
    parts.append("")
  picks = best_by_score(rows)
  parts.append("### Picks\n")
  parts.append("| score | source | freeze rule |")
  parts.append("|---|---|---|")
  for name, c in picks.items():
    parts.append(f"| {name} | {c.source.label} | {c.freeze_rule} |")
  return "\n".join(parts)


def write_csv(rows: Sequence[ScoreRow], path: str) -> None:
  """One line per (candidate, score): source, weights, stage, freeze rule, value, seconds."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["source", "model", "weights", "stage", "freeze_rule", "score", "value",
                     "seconds", "feature_seconds"])
    for r in rows:
      c = r.candidate
      writer.writerow([c.source.label, c.source.model, c.source.weights, c.stage,
                       c.freeze_rule, r.score, "" if math.isnan(r.value) else repr(r.value),
                       f"{r.seconds:.4f}", f"{r.feature_seconds:.3f}"])


def plot(rows: Sequence[ScoreRow], path: str, title: str = "") -> None:
  """Each score over the stages (input side first), one line per source; the pick starred."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
  names = [n for n in dict.fromkeys(r.score for r in rows)
           if any(r.score == n and not math.isnan(r.value) for r in rows)]
  if not names:
    raise RankError("No score applies to any candidate: nothing to plot.")
  columns = min(3, len(names))
  lines = math.ceil(len(names) / columns)
  figure, axes = pyplot.subplots(lines, columns, figsize=(4.6 * columns, 3.4 * lines),
                                 squeeze=False)
  picks = best_by_score(rows)
  sources = list(dict.fromkeys(r.candidate.source for r in rows))
  # Each source's candidates, input side first. Sources with the same stages
  # share stage-named ticks; otherwise x is the position in each source's own
  # list (0 = its first candidate, 1 = its last), so depths line up.
  candidates = {s: [c for c in dict.fromkeys(r.candidate for r in rows) if c.source == s]
                for s in sources}
  same_stages = len({tuple(c.stage for c in cs) for cs in candidates.values()}) == 1
  def x_of(candidate):
    own = candidates[candidate.source]
    k = own.index(candidate)
    return float(k) if same_stages else k / max(1, len(own) - 1)
  for ax, name in zip(axes.flat, names):
    for source in sources:
      own = [r for r in rows if r.score == name and r.candidate.source == source
             and not math.isnan(r.value)]
      if not own:
        continue
      x = [x_of(r.candidate) for r in own]
      ax.plot(x, [r.value for r in own], marker="o", label=source.label)
      for r in own:
        if picks.get(name) == r.candidate:
          ax.plot([x_of(r.candidate)], [r.value], marker="*", markersize=16, color="black",
                  zorder=5)
    if same_stages:
      first = candidates[sources[0]]
      ax.set_xticks([x_of(c) for c in first], [f"{c.stage}\n{c.freeze_rule}" for c in first],
                    rotation=45 if len(first) > 4 else 0, ha="right" if len(first) > 4 else "center",
                    fontsize=7)
    else:
      ax.set_xlim(-0.05, 1.05)
      ax.set_xlabel("stage, input side (0) to pre_logits (1)", fontsize=8)
    ax.set_title(name)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
                frameon=False)
  figure.suptitle((title + "\n" if title else "") + "higher = better predicted transfer; "
                  "\u2605 = the score's pick", fontsize=10)
  figure.tight_layout(rect=(0, 0.06, 1, 1))
  figure.savefig(path, dpi=110)
  pyplot.close(figure)


@dataclasses.dataclass(frozen=True)
class Agreement:
  """How well one score's ranking agrees with a sweep's measured accuracies.

  Attributes:
    score: the score's name.
    candidates: the candidates both ranked and fine-tuned.
    weighted_tau: scipy's weighted Kendall tau (top ranks weigh more).
    pearson: Pearson correlation of score and mean accuracy.
    pick: the score's top candidate among them.
    pick_within_one_se: whether its mean accuracy is within one standard
      error of the best candidate's mean.
  """
  score: str
  candidates: int
  weighted_tau: float
  pearson: float
  pick: Candidate
  pick_within_one_se: bool


def compare_with_sweep(rows: Sequence[ScoreRow],
                       accuracy: dict[tuple[str, str], Sequence[float]]) -> list[Agreement]:
  """Each score against fine-tuned accuracies over seeds.

  Args:
    rows: from `rank`.
    accuracy: `{(source label, freeze rule): [accuracy of each seed]}` from a
      sweep (its evaluation split; the scores never read it).

  Returns:
    One Agreement per score that applies to at least three of the swept
    candidates (fewer gives no correlation worth the name).
  """
  from scipy import stats  # pylint: disable=import-outside-toplevel
  out = []
  for name in dict.fromkeys(r.score for r in rows):
    pairs = [(r, accuracy[(r.candidate.source.label, r.candidate.freeze_rule)]) for r in rows
             if r.score == name and not math.isnan(r.value)
             and (r.candidate.source.label, r.candidate.freeze_rule) in accuracy]
    if len(pairs) < 3:
      continue
    values = np.array([r.value for r, _ in pairs])
    means = np.array([np.mean(a) for _, a in pairs])
    errors = np.array([np.std(a, ddof=1) / math.sqrt(len(a)) if len(a) > 1 else 0.0
                       for _, a in pairs])
    tau = float(stats.weightedtau(values, means).statistic)
    pearson = float(np.corrcoef(values, means)[0, 1])
    best = int(np.argmax(means))
    pick = int(np.argmax(values))
    out.append(Agreement(name, len(pairs), tau, pearson, pairs[pick][0].candidate,
                         bool(means[pick] >= means[best] - errors[best])))
  return out


def write_report(rows: Sequence[ScoreRow], output: str) -> dict:
  """The picks as JSON beside the tables (for scripts); returns what it wrote."""
  report = {"picks": {name: {"source": c.source.label, "stage": c.stage,
                             "freeze_rule": c.freeze_rule}
                      for name, c in best_by_score(rows).items()},
            "seconds": {name: sum(r.seconds for r in rows if r.score == name)
                        for name in dict.fromkeys(r.score for r in rows)}}
  files.write_json(os.path.join(output, "ranking.json"), report)
  return report
