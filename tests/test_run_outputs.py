"""What a run shows and leaves: log lines or a progress bar, result.json, the plot, permissions.

Through the real command line (`tlflax.cli.train.main`), on the offline digits,
a few steps of 16 images.
"""

import io
import json
import logging
import os
import re
import sys

import pytest

from conftest import metric_lines
from tlflax.cli import train as train_command
from tlflax.training import metrics, preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.batch_size=16", "--config.eval_batch_size=32", "--config.log_every_steps=1",
         "--config.model.name=cifar_resnet20"]
UMASK = 0o027  # not the usual 022, so a file that ignores the umask shows


def train(workdir, *overrides) -> int:
  return train_command.main([f"--config={REPO}/configs/digits.py", f"--workdir={workdir}",
                             *SMALL, *overrides])


@pytest.fixture(name="umask")
def fixture_umask():
  old = os.umask(UMASK)
  yield UMASK
  os.umask(old)


class Terminal(io.StringIO):
  """A stderr that says it is a terminal."""

  def isatty(self):
    return True


def test_a_finished_run_writes_its_result_and_curves_and_logs_plain_lines(
    tmp_path, capsys, caplog, umask, monkeypatch):
  caplog.set_level(logging.INFO, logger="tlflax")
  assert train(tmp_path, "--config.num_train_steps=2", "--config.eval_every_steps=2") == 0
  out, err = capsys.readouterr()

  # result.json: what the command printed, in a sweep point's schema.
  record = json.loads((tmp_path / "result.json").read_text())
  assert set(record) == {"metrics", "wall_seconds", "finished"}
  assert record["metrics"] == json.loads(out)
  assert record["metrics"]["step"] == 2 and record["metrics"]["start"] == "scratch"
  evaluation = metric_lines(tmp_path)[(2, "eval")]
  assert record["metrics"]["eval/accuracy"] == evaluation["accuracy"]
  assert 0 < record["wall_seconds"] < 3600

  # The plot, and every file with the permissions a plain open gives (0640 here).
  assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for name in ("config.json", "class_names.json", "metrics.jsonl", "result.json",
               "training_curves.png"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name

  # Not a terminal: plain lines, training and evaluation alike, and no bar.
  lines = [r.getMessage() for r in caplog.records if r.name == metrics.__name__]
  number = r"\d+\.\d{4}"
  assert [line.split(":")[0] for line in lines] == ["step 1/2 train", "step 2/2 train",
                                                    "step 2/2 eval"]
  for line in lines[:2]:
    assert re.fullmatch(rf"step \d/2 train: loss {number}, accuracy {number}; [\d,]+ "
                        r"images/s, \d+:\d\d:\d\d left", line), line
  assert lines[2] == (f"step 2/2 eval: loss {evaluation['loss']:.4f}, "
                      f"accuracy {evaluation['accuracy']:.4f}")
  assert "\r" not in err and "\x1b" not in err


def test_on_a_terminal_a_bar_and_a_stopped_run_has_no_result(tmp_path, monkeypatch):
  # A result.json left from an earlier run whose checkpoints were deleted.
  (tmp_path / "result.json").write_text('{"metrics": {"eval/accuracy": 0.99}}')
  terminal = Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  # Stopped (as by SIGTERM) after step 2 of 3.
  monkeypatch.setattr(preemption, "preemption_requested", lambda step=None: step == 2)
  status = train(tmp_path, "--config.num_train_steps=3")
  text = terminal.getvalue()
  assert status == preemption.exit_status(None), text[-2000:]
  # A run that has not finished has no result.json (a sweep reads one as finished).
  assert not (tmp_path / "result.json").exists()
  assert not (tmp_path / "training_curves.png").exists()
  assert "\r" in text and "2/3" in text  # the bar, redrawn in place, at step 2 of 3
  assert re.search(r"loss \d+\.\d{4}, accuracy \d\.\d{4}, [\d,]+ images/s", text)
