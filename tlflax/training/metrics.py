"""Where measurements go: `metrics.jsonl`, TensorBoard, the progress, the result and a plot.

Only process 0 writes. Each JSON line is `{"step": ..., "split": "train" |
"eval", <name>: <value>, ...}`, so a run can be read back with one
`[json.loads(l) for l in open(...)]`. A run that finishes also writes
`result.json` (its final evaluation, as a sweep's point writes it) and
`training_curves.png` (loss and accuracy against steps).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import textwrap
import time
from typing import Any, Mapping, Sequence, TextIO

import jax
import numpy as np

from tlflax import files, tree

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"  # in a workdir once its run has finished
CURVES_FILE = "training_curves.png"
LINE_METRICS = ("loss", "accuracy")  # what a log line shows, train and eval alike


class MetricsWriter:
  """Appends measurements to `WORKDIR/metrics.jsonl` and TensorBoard event files."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._summary = None
    if self.active and tensorboard:
      try:
        from flax.metrics import tensorboard as flax_tensorboard  # pylint: disable=import-outside-toplevel
        self._summary = flax_tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # The JSON lines need nothing more.
        log.warning("TensorFlow not importable: no TensorBoard event files.")

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    if self._summary is not None:
      for name, value in values.items():
        self._summary.scalar(f"{split}/{name}", value, int(step))
      self._summary.flush()

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()


def read_metrics(workdir: str) -> list[dict]:
  """All JSON lines of a run in the order written (empty if it has none yet).

  A run resumed from an earlier checkpoint logs some steps again; the later
  line of a step is the one that counts (see `last_per_step`).
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_line(step: int, total_steps: int, split: str, metrics: Mapping[str, Any],
                stage: str | None = None) -> str:
  """One log line of a run, the same for training and evaluation.

  Examples:
    >>> format_line(40, 40, "eval", {"loss": 0.41234, "accuracy": 0.865}, stage="probe")
    'step 40/40 (stage probe) eval: loss 0.4123, accuracy 0.8650'

  Args:
    step: the step just done.
    total_steps: the run's last step.
    split: "train" or "eval".
    metrics: shows those of `LINE_METRICS` it has, each with 4 decimals.
    stage: the stage's name, for runs of several stages (None: not shown).
  """
  where = f" (stage {stage})" if stage else ""
  return f"step {step}/{total_steps}{where} {split}: {format_metrics(metrics)}"


def format_metrics(metrics: Mapping[str, Any]) -> str:
  """`loss 0.4123, accuracy 0.8650`: the `LINE_METRICS` of `metrics`, 4 decimals each.

  Files that failed to decode (data.skip_bad_files) are counted after them
  when there were any: the numbers beside them cover fewer or other images.
  """
  shown = ", ".join(f"{name} {float(metrics[name]):.4f}" for name in LINE_METRICS
                    if name in metrics)
  if metrics.get("skipped_files"):
    shown += f", skipped_files {int(metrics['skipped_files'])}"
  return shown


def format_duration(seconds: float) -> str:
  """`H:MM:SS` (hours beyond 24 too), e.g. 3725 -> "1:02:05"."""
  seconds = int(round(max(seconds, 0.0)))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """A progress bar on a terminal (tqdm), plain log lines otherwise.

  On a terminal (stderr is a TTY) the bar shows step/total, time left and,
  from each `update`, the loss, accuracy and images per second; log lines
  (evaluations, stages) print above it. Elsewhere (a batch job's log file) each
  `update` is one log line, `step 20/40 train: loss 1.2500, accuracy 0.5000;
  640 images/s, 0:00:08 left`, without the bar's control characters.

  Args:
    total_steps: the run's last step.
    initial_step: the step the run starts (or resumes) from.
    images_per_step: the global batch size.
    bar: show a bar; None: when `stream` is a terminal.
    stream: where the bar goes (default: sys.stderr at the time).
  """

  def __init__(self, total_steps: int, initial_step: int, images_per_step: int,
               bar: bool | None = None, stream: TextIO | None = None):
    self.total, self.images_per_step = total_steps, images_per_step
    self.active = jax.process_index() == 0
    self._bar = None
    self._redirect = contextlib.ExitStack()
    self._last_time, self._last_step = time.perf_counter(), initial_step
    stream = stream if stream is not None else sys.stderr
    if bar is None:
      bar = bool(getattr(stream, "isatty", lambda: False)())
    if self.active and bar:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      from tqdm.contrib.logging import logging_redirect_tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", file=stream,
                       dynamic_ncols=True)
      # Log lines go above the bar instead of through it.
      self._redirect.enter_context(logging_redirect_tqdm())

  @property
  def shows_bar(self) -> bool:
    return self._bar is not None

  def advance(self, step: int) -> None:
    """Moves the bar to `step` (a step done); without a bar, nothing."""
    if self._bar is not None and step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def update(self, step: int, metrics: Mapping[str, float], stage: str | None = None) -> float:
    """Reports training at `step`; returns images per second since the last call.

    Args:
      step: the step just done.
      metrics: its training measurements (`LINE_METRICS` are shown).
      stage: the stage's name, for runs of several stages.
    """
    now = time.perf_counter()
    rate = (step - self._last_step) * self.images_per_step / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    if not self.active:
      return rate
    if self._bar is not None:
      self.advance(step)
      if stage:
        self._bar.set_description(f"stage {stage}", refresh=False)
      self._bar.set_postfix_str(f"{format_metrics(metrics)}, {rate:,.0f} images/s")
    else:
      remaining = (self.total - step) * self.images_per_step / max(rate, 1e-9)
      log.info("%s; %s images/s, %s left", format_line(step, self.total, "train", metrics, stage),
               f"{rate:,.0f}", format_duration(remaining))
    return rate

  def evaluated(self, step: int, metrics: Mapping[str, float], stage: str | None = None) -> None:
    """Logs an evaluation at `step`, formatted as the training lines are."""
    if self.active:
      log.info("%s", format_line(step, self.total, "eval", metrics, stage))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    self._redirect.close()


# ----------------------------------------------------------------------------
# The end of a run: result.json and the training curves
# ----------------------------------------------------------------------------

def result_record(result: Mapping[str, Any], wall_seconds: float | None) -> dict[str, Any]:
  """What `result.json` holds, for a single run and a sweep's point alike.

  Args:
    result: what `train_and_evaluate` returned for a finished run
      (`eval/accuracy`, `eval/loss`, `step`, `start`, and `stages` for a
      staged run).
    wall_seconds: how long the run (this invocation of it) took; None when
      it is not known (a finished run whose result.json was lost, written
      again from its checkpoint: JSON null, never a made-up time).

  Returns:
    `{"metrics": result, "wall_seconds": ..., "finished": <UTC time, ISO 8601>}`;
    a sweep adds the point's `point` and `overrides`.
  """
  result = {k: v for k, v in result.items() if k != "already_finished"}
  return {"metrics": tree.to_json(result),
          "wall_seconds": None if wall_seconds is None else float(wall_seconds),
          "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_result(workdir: str, result: Mapping[str, Any], wall_seconds: float | None
                 ) -> dict[str, Any]:
  """Writes `WORKDIR/result.json` (atomically) for a finished run; returns the record.

  Only a finished run has one: a preempted run writes none (a sweep reads a
  point with a result.json as finished), and `remove_result` takes away that
  of an earlier finish when a run trains on.
  """
  record = result_record(result, wall_seconds)
  files.write_json(os.path.join(workdir, RESULT_FILE), record)
  return record


def remove_result(workdir: str) -> None:
  """Removes `WORKDIR/result.json` if there is one (the run is training on)."""
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(workdir, RESULT_FILE))


def last_per_step(lines: Sequence[Mapping[str, Any]], split: str, name: str
                  ) -> tuple[list[int], list[float]]:
  """`name`'s values for `split`, one per step in increasing step order.

  A step logged twice (a run resumed from a checkpoint before it) counts with
  its last line, so a curve never runs back and forth.

  Returns:
    (steps, values).
  """
  by_step = {}
  for line in lines:
    if line.get("split") == split and name in line:
      by_step[int(line["step"])] = float(line[name])
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def plot_training_curves(workdir: str, stage_ends: Sequence[tuple[str, int]] = (),
                         title: str = "", path: str | None = None) -> str | None:
  """Plots a run's loss and accuracy against steps from its whole `metrics.jsonl`.

  Args:
    workdir: the run's directory.
    stage_ends: `(stage name, last step)` of each stage, for runs of
      several stages.
    title: the figure's title (e.g. the run's name and model).
    path: the PNG to write; default `WORKDIR/training_curves.png`.

  Returns:
    The path written (atomically), or None when metrics.jsonl holds no line.
  """
  lines = read_metrics(workdir)
  if not lines:
    log.warning("No training curves: %s has no lines yet.", os.path.join(workdir, "metrics.jsonl"))
    return None
  path = path or os.path.join(workdir, CURVES_FILE)
  figure = training_curves_figure(lines, stage_ends, title)
  with files.atomic_file(path, "wb") as f:
    figure.savefig(f, format="png", dpi=110)
  return path


def training_curves_figure(lines: Sequence[Mapping[str, Any]],
                           stage_ends: Sequence[tuple[str, int]] = (), title: str = ""):
  """The figure of `plot_training_curves`, from metrics.jsonl's lines.

  Two panels, loss and accuracy (%), each with the training curve (the
  logged steps' batches) and the evaluations, one point per step
  (`last_per_step`); dashed lines mark where a stage ends. The loss is on a
  log scale when it spans 20x or more (an early spike would flatten the rest).

  Returns:
    A matplotlib Figure (no pyplot: no global state).
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  figure = Figure(figsize=(9.0, 3.8), layout="constrained")
  panels = figure.subplots(1, 2, sharex=True)
  for axes, name, scale, label in ((panels[0], "loss", 1.0, "loss"),
                                   (panels[1], "accuracy", 100.0, "accuracy (%)")):
    for split, color in (("train", "C0"), ("eval", "C1")):
      steps, values = last_per_step(lines, split, name)
      if not steps:
        continue
      # Evaluations are few: each marked. Training marked while its points are few.
      marker = dict(marker="o", markersize=4) if split == "eval" else (
          dict(marker=".", markersize=3) if len(steps) < 40 else {})
      axes.plot(steps, [scale * v for v in values], color=color, linewidth=1.2, label=split,
                **marker)
    start = 0
    for index, (stage, end) in enumerate(stage_ends if len(stage_ends) > 1 else ()):
      if index < len(stage_ends) - 1:
        axes.axvline(end, color="0.4", linestyle="--", linewidth=0.8)
      axes.text((start + end) / 2, 1.01, stage, transform=axes.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8, color="0.3")
      start = end
    plotted = [v for line in axes.get_lines() for v in line.get_ydata()]
    if name == "loss" and plotted and min(plotted) > 0 and max(plotted) / min(plotted) >= 20:
      axes.set_yscale("log")  # an early spike would flatten the rest
      label += " (log scale)"
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))  # whole steps
    axes.set_xlabel("step")
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
      axes.legend(fontsize=8)
  if title:
    figure.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=10)
  return figure
