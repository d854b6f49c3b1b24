"""Where measurements go: `metrics.jsonl`, TensorBoard, and a progress line.

Only process 0 writes. Each JSON line is `{"step": ..., "split": "train" |
"eval", <name>: <value>, ...}`, so a run can be read back with one
`[json.loads(l) for l in open(...)]`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)


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
  """All JSON lines of a run (empty if it has none yet)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A progress bar on a terminal (tqdm), plain log lines otherwise."""

  def __init__(self, total_steps: int, initial_step: int, images_per_step: int):
    self.total, self.images_per_step = total_steps, images_per_step
    self.active = jax.process_index() == 0
    self._bar = None
    self._last_time, self._last_step = time.perf_counter(), initial_step
    if self.active and sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

  def update(self, step: int, metrics: Mapping[str, float]) -> float:
    """Reports training progress at `step`; returns images per second since last call."""
    now = time.perf_counter()
    rate = (step - self._last_step) * self.images_per_step / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    if not self.active:
      return rate
    summary = (f"loss {float(metrics['loss']):.4f}  accuracy {float(metrics['accuracy']):.3f}  "
               f"{rate:,.0f} images/s")
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix_str(summary)
    else:
      remaining = (self.total - step) * self.images_per_step / max(rate, 1e-9)
      log.info("step %d/%d  %s  ETA %s", step, self.total, summary,
                   time.strftime("%H:%M:%S", time.gmtime(remaining)))
    return rate

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
