"""Where measurements go (metrics.py): metrics.jsonl, TensorBoard event files, progress."""

import glob
import json
import logging
import math
import os
import time
import warnings

import jax
import numpy as np
import pytest

from conftest import metric_lines
from tlflax.training import metrics


def test_lines_are_written_and_read_back_exactly(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(1, "train", {"loss": np.float32(0.5), "accuracy": 0.25})
  writer.write(np.int64(2), "eval", {"accuracy": jax.numpy.asarray(0.75), "loss": 2})
  writer.write(3, "train", {})
  writer.close()
  lines = [{"step": 1, "split": "train", "loss": 0.5, "accuracy": 0.25},
           {"step": 2, "split": "eval", "accuracy": 0.75, "loss": 2.0},
           {"step": 3, "split": "train"}]
  assert metrics.read_metrics(str(tmp_path)) == lines
  with open(tmp_path / "metrics.jsonl") as f:
    text = f.read()
  assert text == "".join(json.dumps(line) + "\n" for line in lines)
  assert type(metrics.read_metrics(str(tmp_path))[1]["loss"]) is float
  assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no TensorBoard directory
  assert metric_lines(tmp_path)[(2, "eval")] == lines[1]


def test_a_second_writer_appends_and_blank_lines_are_skipped(tmp_path):
  assert metrics.read_metrics(str(tmp_path)) == []  # a run with no lines yet
  first = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  first.write(1, "train", {"loss": 1.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write("\n")
  # A resumed run opens the same file again.
  metrics.MetricsWriter(str(tmp_path), tensorboard=False).write(2, "train", {"loss": 0.5})
  assert metrics.read_metrics(str(tmp_path)) == [{"step": 1, "split": "train", "loss": 1.0},
                                                 {"step": 2, "split": "train", "loss": 0.5}]


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(1, "train", {"loss": 1.0})
  writer.close()
  assert os.listdir(tmp_path) == []


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
  tf = pytest.importorskip("tensorflow")
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(1, "train", {"loss": 0.5})
  writer.write(4, "eval", {"accuracy": 0.25, "loss": 1.5})
  writer.close()
  (event_file,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  scalars = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for event in tf.compat.v1.train.summary_iterator(event_file):
      for value in event.summary.value:
        scalars.append((event.step, value.tag, float(tf.make_ndarray(value.tensor))))
  assert scalars == [(1, "train/loss", 0.5), (4, "eval/accuracy", 0.25), (4, "eval/loss", 1.5)]


def test_progress_reports_images_per_second(monkeypatch, caplog):
  clock = iter([100.0, 102.0, 104.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  progress = metrics.Progress(total_steps=10, initial_step=0, images_per_step=8)
  with caplog.at_level(logging.INFO, logger=metrics.__name__):
    # 2 steps of 8 images in 2 seconds; 8 steps left at 8 images/s take 8 s.
    assert progress.update(2, {"loss": np.float32(1.25), "accuracy": 0.5}) == 8.0
    assert progress.update(6, {"loss": 0.5, "accuracy": 0.75}) == 16.0
  progress.close()
  assert [r.getMessage() for r in caplog.records] == [
      "step 2/10  loss 1.2500  accuracy 0.500  8 images/s  ETA 00:00:08",
      "step 6/10  loss 0.5000  accuracy 0.750  16 images/s  ETA 00:00:02"]


def test_progress_rate_is_finite_and_positive_on_the_real_clock():
  before = time.perf_counter()
  progress = metrics.Progress(total_steps=100, initial_step=10, images_per_step=32)
  time.sleep(0.02)
  rate = progress.update(13, {"loss": 1.0, "accuracy": 0.1})
  elapsed = time.perf_counter() - before
  progress.close()
  assert math.isfinite(rate) and 3 * 32 / elapsed <= rate <= 3 * 32 / 0.02


def test_progress_of_other_processes_logs_nothing(monkeypatch, caplog):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  clock = iter([0.0, 4.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  progress = metrics.Progress(total_steps=10, initial_step=0, images_per_step=2)
  with caplog.at_level(logging.INFO, logger=metrics.__name__):
    assert progress.update(4, {}) == 2.0  # metrics not even read
  assert caplog.records == []
