"""Where measurements go (metrics.py): metrics.jsonl, TensorBoard event files, progress."""

import glob
import io
import json
import logging
import math
import os
import re
import sys
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


class Terminal(io.StringIO):
  """A stream that says it is a terminal, and keeps what is written to it."""

  def isatty(self):
    return True


def test_progress_without_a_terminal_logs_plain_lines(monkeypatch, caplog):
  clock = iter([100.0, 102.0, 104.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  stream = io.StringIO()  # a log file: not a terminal
  progress = metrics.Progress(total_steps=10, initial_step=0, images_per_step=8, stream=stream)
  assert not progress.shows_bar
  with caplog.at_level(logging.INFO, logger=metrics.__name__):
    # 2 steps of 8 images in 2 seconds; 8 steps left at 8 images/s take 8 s.
    progress.advance(1)
    assert progress.update(2, {"loss": np.float32(1.25), "accuracy": 0.5}) == 8.0
    assert progress.update(6, {"loss": 0.5, "accuracy": 0.75}, stage="probe") == 16.0
    progress.evaluated(6, {"loss": 0.41234, "accuracy": 0.865, "count": 3.0}, stage="probe")
  progress.close()
  assert [r.getMessage() for r in caplog.records] == [
      "step 2/10 train: loss 1.2500, accuracy 0.5000; 8 images/s, 0:00:08 left",
      "step 6/10 (stage probe) train: loss 0.5000, accuracy 0.7500; 16 images/s, 0:00:02 left",
      "step 6/10 (stage probe) eval: loss 0.4123, accuracy 0.8650"]
  assert stream.getvalue() == ""  # no bar, no control characters


def test_progress_on_a_terminal_draws_a_bar_and_logs_above_it(monkeypatch):
  terminal = Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  console = logging.StreamHandler(sys.stderr)  # as tlflax.cli.app sets up logging
  monkeypatch.setattr(logging.root, "handlers", [*logging.root.handlers, console])
  progress = metrics.Progress(total_steps=10, initial_step=2, images_per_step=8)
  assert progress.shows_bar
  for step in (3, 4):
    progress.advance(step)
  progress.update(4, {"loss": 1.25, "accuracy": 0.5})
  logging.getLogger("tlflax.test").warning("a log line while the bar is shown")
  progress.evaluated(4, {"loss": 0.5, "accuracy": 0.75})
  progress.close()
  text = terminal.getvalue()
  assert "\r" in text  # the bar redraws its line
  assert "4/10" in text and "loss 1.2500, accuracy 0.5000" in text and "images/s" in text
  # tqdm's time left: [elapsed<remaining, rate]
  assert re.search(r"4/10 \[\d\d:\d\d<\d\d:\d\d", text)
  # Log lines go through the bar's writer, each on a line of its own.
  assert "\na log line while the bar is shown\n" in "\n" + text.replace("\r", "\n")
  assert logging.root.handlers[-1] is console  # the console handler is back after close


def test_one_format_for_training_and_evaluation_lines():
  values = {"loss": np.float32(0.41234), "accuracy": 0.865, "images_per_second": 99.0}
  assert metrics.format_line(40, 40, "eval", values) == (
      "step 40/40 eval: loss 0.4123, accuracy 0.8650")
  assert metrics.format_line(7, 40, "train", values, stage="probe") == (
      "step 7/40 (stage probe) train: loss 0.4123, accuracy 0.8650")
  assert metrics.format_duration(3725.4) == "1:02:05"
  assert metrics.format_duration(90_000) == "25:00:00"  # past a day, not wrapped


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


# ----------------------------------------------------------------------------
# The end of a run: result.json and the training curves
# ----------------------------------------------------------------------------

def test_result_json_is_the_sweep_points_schema_without_the_point(tmp_path):
  result = {"step": np.int64(40), "start": "pretrained", "eval/accuracy": np.float32(0.5),
            "eval/loss": 1.25, "stages": {"probe": {"eval/accuracy": 0.25}}}
  record = metrics.write_result(str(tmp_path), result, wall_seconds=12.5)
  assert json.loads((tmp_path / "result.json").read_text()) == record
  assert record["metrics"] == {"step": 40, "start": "pretrained", "eval/accuracy": 0.5,
                               "eval/loss": 1.25, "stages": {"probe": {"eval/accuracy": 0.25}}}
  assert record["wall_seconds"] == 12.5
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["finished"])
  metrics.remove_result(str(tmp_path))
  metrics.remove_result(str(tmp_path))  # none there: nothing to do
  assert os.listdir(tmp_path) == []


# A run of 4 steps, resumed from its step-2 checkpoint after logging step 3:
# steps 3 and 4 are logged again, and the later lines count.
RESUMED_LINES = [
    {"step": 1, "split": "train", "loss": 2.0, "accuracy": 0.1},
    {"step": 2, "split": "train", "loss": 1.8, "accuracy": 0.2},
    {"step": 2, "split": "eval", "loss": 1.9, "accuracy": 0.25},
    {"step": 3, "split": "train", "loss": 9.0, "accuracy": 0.9},  # before the resume
    {"step": 3, "split": "train", "loss": 1.5, "accuracy": 0.3},
    {"step": 4, "split": "train", "loss": 1.2, "accuracy": 0.4},
    {"step": 4, "split": "eval", "loss": 1.4, "accuracy": 0.45},
]


def test_a_step_logged_twice_counts_once_with_its_last_line():
  assert metrics.last_per_step(RESUMED_LINES, "train", "loss") == ([1, 2, 3, 4],
                                                                   [2.0, 1.8, 1.5, 1.2])
  assert metrics.last_per_step(RESUMED_LINES, "eval", "accuracy") == ([2, 4], [0.25, 0.45])
  assert metrics.last_per_step(RESUMED_LINES, "eval", "images_per_second") == ([], [])


def test_training_curves_go_forward_in_steps_and_mark_stages():
  shuffled = RESUMED_LINES[3:] + RESUMED_LINES[:3]  # a resume from step 0 after step 4
  figure = metrics.training_curves_figure(shuffled, [("probe", 2), ("fine_tune", 4)], "run")
  loss_panel, accuracy_panel = figure.axes
  curves = {(axes.get_ylabel(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
            for axes in figure.axes for line in axes.get_lines() if line.get_label() in
            ("train", "eval")}
  assert curves[("loss", "train")] == ([1, 2, 3, 4], [2.0, 1.8, 1.5, 1.2])
  assert curves[("loss", "eval")] == ([2, 4], [1.9, 1.4])
  # Accuracy in %; x * 100 in float64 is not always the decimal, so approx.
  assert curves[("accuracy (%)", "eval")][1] == pytest.approx([25.0, 45.0])
  for axes in (loss_panel, accuracy_panel):  # the stage boundary, and the stages named
    boundaries = [line.get_xdata()[0] for line in axes.get_lines() if line.get_linestyle() == "--"]
    assert boundaries == [2]
    assert [t.get_text() for t in axes.texts] == ["probe", "fine_tune"]
  assert figure.get_suptitle() == "run"


def test_training_curves_png_from_a_workdir(tmp_path):
  assert metrics.plot_training_curves(str(tmp_path)) is None  # no lines yet: no plot
  writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  for line in RESUMED_LINES:
    writer.write(line["step"], line["split"], {k: v for k, v in line.items()
                                               if k not in ("step", "split")})
  path = metrics.plot_training_curves(str(tmp_path))
  assert path == str(tmp_path / "training_curves.png")
  assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
