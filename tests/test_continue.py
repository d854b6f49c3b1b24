"""Runs that continue another run, and runs into a workdir that holds one, through the command line.

A run started from a training run of the same task keeps the head it
trained (`init.keep_head` unset: same class names in the same order); a
finished workdir answers with its stored result when rerun with the same
settings and refuses other settings; a run stopped mid-way resumes with
changed settings, and the log lists them. `tlflax.cli.train.main(argv)` is
the whole command line of `python -m tlflax.main`, called in this process.
"""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import metric_lines
from tlflax import defaults, sweeps
from tlflax.cli import train as train_cli
from tlflax.training import checkpoint, loop, preemption
from tlflax.training import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = f"--config={REPO}/configs/digits.py"
# A few steps of 16 images (8 simulated devices, 2 images each) on digits 0-4.
SMALL = [DIGITS, "--config.batch_size=16", "--config.eval_batch_size=32",
         "--config.log_every_steps=1"]
FIRST = [*SMALL, "--config.num_train_steps=3"]


def run(capsys, caplog, *argv) -> tuple[int, dict | None, list[str], list[str]]:
  """The exit status, the printed result, the error lines and tlflax's log lines."""
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="tlflax"):
    status = train_cli.main(list(argv))
  captured = capsys.readouterr()
  errors = [line for line in captured.err.splitlines() if line.startswith("tlflax.main:")]
  result = json.loads(captured.out) if captured.out.startswith("{") else None
  return status, result, errors, [r.getMessage() for r in caplog.records]


def files_in(workdir) -> dict[str, float]:
  """Every file under `workdir` with its modification time."""
  return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
          for root, _, names in os.walk(workdir) for name in names}


@pytest.fixture(name="first_run", scope="module")
def fixture_first_run(tmp_path_factory):
  """A finished 3-step run on digits 0-4: (workdir, its result)."""
  workdir = tmp_path_factory.mktemp("continue") / "first"
  assert train_cli.main([*FIRST, f"--workdir={workdir}"]) == 0
  with open(workdir / "result.json", encoding="utf-8") as f:
    return workdir, json.load(f)["metrics"]


def test_a_run_started_from_a_run_of_the_same_task_keeps_its_head(first_run, tmp_path, capsys,
                                                                   caplog):
  workdir, first = first_run
  # Step 1 updates at rate 0 (digits.py warms up from 0) and the body is frozen with
  # its BatchNorm in inference mode, so the evaluation at step 1 is that of the
  # variables the run starts from: the same images in the same order, evaluated by
  # the same computation in this process, so equal to the last bit.
  status, _, errors, logged = run(
      capsys, caplog, *SMALL, "--config.num_train_steps=2", f"--workdir={tmp_path / 'second'}",
      f"--config.init.weights={workdir}", "--config.init.source=workdir",
      "--config.freeze.rules=linear_probe", "--config.eval_every_steps=1")
  assert status == 0, errors
  assert f"Kept the head of {workdir} (classes 0, 1, 2, 3, 4)." in logged
  second = metric_lines(tmp_path / "second")[(1, "eval")]
  assert (second["loss"], second["accuracy"]) == (first["eval/loss"], first["eval/accuracy"])


def test_a_task_of_other_classes_gets_a_new_head_or_an_error(first_run, tmp_path, capsys, caplog):
  workdir, _ = first_run
  start = [f"--config.init.weights={workdir}", "--config.init.source=workdir"]
  two = image_folder(tmp_path / "two", classes=("0", "7"))
  status, _, errors, logged = run(capsys, caplog, *SMALL, *start, *folder_args(two),
                                  "--config.num_train_steps=1", f"--workdir={tmp_path / 'a'}")
  assert status == 0, errors
  assert "New head: the source's head has 5 classes, this task 2." in logged
  # As many classes, some of them the source's: only the user knows what is meant.
  five = image_folder(tmp_path / "five", classes=("0", "1", "2", "3", "9"))
  status, _, errors, _ = run(capsys, caplog, *SMALL, *start, *folder_args(five),
                             f"--workdir={tmp_path / 'b'}")
  assert status == 1 and errors == [
      f"tlflax.main: error: The head of {workdir} predicts 5 classes, some of them this "
      "task's: its classes are 0, 1, 2, 3, 4; this task's are 0, 1, 2, 3, 9. Set "
      "--config.init.keep_head=False for a new head, or --config.init.keep_head=True to keep "
      "this head as it is (its outputs keep the source's order)."]
  assert not (tmp_path / "b").exists()


def test_a_finished_workdir_answers_with_its_result_for_the_same_settings(first_run, capsys,
                                                                          caplog):
  workdir, first = first_run
  before = files_in(workdir)
  # data.num_workers says who decodes the images, not what the run computes.
  status, result, errors, logged = run(capsys, caplog, *FIRST, f"--workdir={workdir}",
                                       "--config.data.num_workers=0")
  assert status == 0, errors
  assert result == {**first, "already_finished": True}
  assert (f"{workdir} has finished already (step 3 of 3) with these settings: nothing to "
          "train. Its result:") in logged
  assert files_in(workdir) == before   # nothing written, nothing touched


def test_a_finished_run_that_lost_its_result_file_gets_it_back_without_a_run_time(
    first_run, tmp_path, capsys, caplog):
  """Killed between its last checkpoint and result.json: finished, its time unknown."""
  workdir = tmp_path / "copy"
  shutil.copytree(first_run[0], workdir)
  os.remove(workdir / "result.json")
  status, result, errors, logged = run(capsys, caplog, *FIRST, f"--workdir={workdir}")
  assert status == 0, errors
  assert result == {**first_run[1], "already_finished": True}
  record = json.loads((workdir / "result.json").read_text())
  assert record["metrics"] == first_run[1] and record["wall_seconds"] is None
  assert any("written now from its last checkpoint" in line for line in logged)


@pytest.mark.parametrize("changed, listed", [
    (["--config.optimizer.learning_rate=0.5"], "optimizer.learning_rate: 0.05 -> 0.5"),
    (["--config.num_train_steps=6", "--config.seed=1"], "num_train_steps: 3 -> 6; seed: 0 -> 1"),
])
def test_a_finished_workdir_refuses_other_settings(first_run, changed, listed, capsys, caplog):
  workdir, _ = first_run
  before = files_in(workdir)
  status, result, errors, _ = run(capsys, caplog, *FIRST, f"--workdir={workdir}", *changed)
  assert status == 1 and result is None
  assert errors == [
      f"tlflax.main: error: {workdir} holds a finished run (step 3 of 3) with other settings: "
      f"{listed}. Its result is that of its own settings; to train with these, use another "
      "--workdir, or start from this run in another workdir with "
      f"--config.init.weights={workdir} --config.init.source=workdir."]
  assert files_in(workdir) == before   # no config.resumed_at_step_3.json, nothing else


def test_a_run_stopped_mid_way_resumes_with_changed_settings_listed(tmp_path, capsys, caplog,
                                                                    monkeypatch):
  workdir = tmp_path / "run"
  argv = [*SMALL, "--config.num_train_steps=4", f"--workdir={workdir}"]
  # Stopped after step 2 as a SIGTERM stops it (the loop saves and returns).
  monkeypatch.setattr(preemption, "preemption_requested", lambda step=None: step == 2)
  status, result, _, _ = run(capsys, caplog, *argv)
  assert status == preemption.exit_status("SIGTERM") and result["preempted"]
  assert checkpoint.recorded_total_steps(workdir, 2) == 4
  monkeypatch.setattr(preemption, "preemption_requested", lambda step=None: False)
  status, result, errors, logged = run(capsys, caplog, *argv,
                                       "--config.optimizer.learning_rate=0.1")
  assert status == 0, errors
  assert result["step"] == 4 and "already_finished" not in result
  assert (f"Resuming {workdir} at step 2 of 4 with changed settings: "
          "optimizer.learning_rate: 0.05 -> 0.1.") in logged
  assert workdir_lib.config_record(workdir)["optimizer"]["learning_rate"] == 0.1
  assert os.path.exists(workdir / "config.resumed_at_step_2.json")
  # Finished now: the settings it finished with are the ones in force.
  status, result, _, _ = run(capsys, caplog, *argv, "--config.optimizer.learning_rate=0.1")
  assert status == 0 and result["already_finished"]


def test_a_redefined_sweep_refuses_finished_points_it_gives_other_settings(tmp_path, monkeypatch):
  def fake_training(config, workdir):  # records its config as a run does
    workdir_lib.write_config(workdir, config)
    return {"eval/accuracy": 0.5, "eval/loss": 1.0, "step": 1, "start": "scratch"}
  monkeypatch.setattr(loop, "train_and_evaluate", fake_training)
  config = defaults.base_config()
  points = sweeps.make_points([{"seed": 0}, {"seed": 1}], config)
  sweeps.run_sweep(config, points, str(tmp_path))
  # A new point beside unchanged finished ones: fine.
  more = sweeps.make_points([{"seed": 0}, {"seed": 1}, {"seed": 2}], config)
  sweeps.prepare(config, more, str(tmp_path), overwrite=True)
  changed = defaults.base_config()
  changed.optimizer.learning_rate = 0.5
  with pytest.raises(sweeps.SweepError) as raised:
    sweeps.prepare(changed, more, str(tmp_path), overwrite=True)
  assert str(raised.value) == (
      "The redefined sweep changes settings of finished points, whose results would be "
      "reported as this sweep's: seed-0 (optimizer.learning_rate: 0.01 -> 0.5); seed-1 "
      "(optimizer.learning_rate: 0.01 -> 0.5). Use another --workdir, or delete those "
      "points' directories to re-run them.")


def image_folder(root, classes, per_class=4):
  """Image folders `root/{train,val}/<class>/` of small solid images."""
  for split in ("train", "val"):
    for index, name in enumerate(classes):
      os.makedirs(root / split / name, exist_ok=True)
      for k in range(per_class):
        pixels = np.full((40, 48, 3), 40 * index + 10 * k, np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{k}.png")
  return root


def folder_args(root):
  return ["--config.data.source=folder", f"--config.data.path={root}",
          "--config.data.train_split=train", "--config.data.eval_split=val",
          "--config.data.augment=none", "--config.batch_size=8", "--config.eval_batch_size=8"]
