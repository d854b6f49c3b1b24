"""A run's workdir (workdir.py): config.json written once, the is-a-file checks."""

import json
import os

import jax
import numpy as np
import pytest

from tlflax import defaults, stages
from tlflax.training import checkpoint, workdir


def test_config_is_written_once_beside_the_checkpoints(tmp_path):
  config = defaults.base_config()
  checkpoint.Checkpointer(tmp_path, config=config).close()
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["keep_checkpoints"] == config.keep_checkpoints
  assert written["optimizer"]["name"] == config.optimizer.name

  checkpoint.Checkpointer(tmp_path, config=config).close()   # resumed, same config
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]
  config.num_epochs = 20.0                                     # resumed, changed
  checkpoint.Checkpointer(tmp_path, config=config).close()
  assert json.loads((tmp_path / "config.json").read_text())["num_epochs"] == 10.0
  assert json.loads((tmp_path / "config.resumed_at_step_0.json").read_text())["num_epochs"] == 20.0


def test_only_process_zero_writes_the_config(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  checkpoint.Checkpointer(tmp_path, config={"seed": 0}).close()
  assert not (tmp_path / "config.json").exists()


def test_config_to_json_is_indented_and_key_sorted():
  assert workdir.config_to_json({"b": 1, "a": (1, 2)}) == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
  config = defaults.base_config()
  text = workdir.config_to_json(config)
  assert text.endswith("}\n") and json.loads(text) == json.loads(config.to_json(sort_keys=True))
  keys = list(json.loads(text))
  assert keys == sorted(keys) and "optimizer" in keys


def test_write_config_names_the_resumed_step_and_returns_what_it_wrote(tmp_path):
  run = str(tmp_path / "run")
  first = workdir.write_config(run, {"seed": 0})
  assert first == os.path.join(run, "config.json")
  assert workdir.write_config(run, {"seed": 0}, resumed_at=40) == first  # unchanged: nothing new
  assert sorted(os.listdir(run)) == ["config.json"]
  changed = workdir.write_config(run, {"seed": 1}, resumed_at=40)
  assert changed == os.path.join(run, "config.resumed_at_step_40.json")
  assert sorted(os.listdir(run)) == ["config.json", "config.resumed_at_step_40.json"]
  with open(first) as f:
    assert json.load(f) == {"seed": 0}
  with open(changed) as f:
    assert f.read() == '{\n  "seed": 1\n}\n'


def test_a_workdir_or_its_checkpoints_that_is_a_file_is_refused(tmp_path, monkeypatch):
  a_file = tmp_path / "file"
  a_file.write_text("not a directory")
  with pytest.raises(workdir.CheckpointError,
                     match=f"^{a_file} is a file, not a directory; choose another workdir"):
    workdir.usable_workdir(a_file)
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").write_text("not a directory")
  with pytest.raises(workdir.CheckpointError,
                     match=f"^{tmp_path / 'run' / 'checkpoints'} is a file"):
    workdir.usable_workdir(tmp_path / "run")
  assert checkpoint.CheckpointError is workdir.CheckpointError
  assert issubclass(workdir.CheckpointError, ValueError)
  # A workdir that does not exist yet is fine (as an absolute path), and not created.
  monkeypatch.chdir(tmp_path)
  assert workdir.usable_workdir("new") == str(tmp_path / "new")
  assert not (tmp_path / "new").exists()


def test_the_config_in_force_is_the_latest_record(tmp_path):
  run = str(tmp_path)
  workdir.write_config(run, {"lr": 1})
  assert workdir.config_record_path(run) == os.path.join(run, "config.json")
  workdir.write_config(run, {"lr": 2}, resumed_at=10)
  workdir.write_config(run, {"lr": 3}, resumed_at=9)   # steps order the files, not names
  assert workdir.config_record(run) == {"lr": 2}
  # Back to the first config at step 20: it differs from the one in force, so it is recorded.
  assert workdir.write_config(run, {"lr": 1}, resumed_at=20) == os.path.join(
      run, "config.resumed_at_step_20.json")
  assert workdir.config_record(run) == {"lr": 1}
  assert workdir.write_config(run, {"lr": 1}, resumed_at=30) == os.path.join(
      run, "config.resumed_at_step_20.json")  # unchanged: nothing new
  assert workdir.config_record(str(tmp_path / "none")) is None


def test_changed_settings_list_each_key_and_leave_out_where_a_run_executes():
  recorded_config = defaults.base_config()
  recorded_config.data.mean = (0.485, 0.456, 0.406)  # as a run records ImageNet's
  recorded = json.loads(workdir.config_to_json(recorded_config))
  config = defaults.base_config()
  config.optimizer.learning_rate = 0.5
  config.data.mean = (0.5, 0.5, 0.5)
  config.data.name = "target"
  # Where and how the run executes: not a setting of the run.
  config.data.num_workers = 3
  config.distributed.coordinator_address = "10.0.0.1:1234"
  config.prefix_cache.directory = "/elsewhere"
  changes = workdir.changed_settings(recorded, config)
  assert changes == [("data.mean", [0.485, 0.456, 0.406], [0.5, 0.5, 0.5]),
                     ("data.name", "", "target"), ("optimizer.learning_rate", 0.01, 0.5)]
  assert workdir.describe_changes(changes) == (
      "data.mean: [0.485, 0.456, 0.406] -> [0.5, 0.5, 0.5]; data.name: '' -> 'target'; "
      "optimizer.learning_rate: 0.01 -> 0.5")
  assert workdir.changed_settings(recorded, recorded_config) == []
  # A key only one side has (a config written by another version of tlflax).
  del recorded["label_smoothing"]
  assert workdir.describe_changes(workdir.changed_settings(recorded, recorded_config)) == (
      "label_smoothing: (not set) -> 0.0")
  # Stages differ in the keys of a stage, and those are what is named.
  staged = defaults.base_config()
  staged.stages = stages.lp_ft(3, 1, 0.1, 0.02, unit="steps")
  longer = defaults.base_config()
  longer.stages = stages.lp_ft(2, 4, 0.1, 0.02, unit="steps")
  assert workdir.describe_changes(workdir.changed_settings(staged, longer)) == (
      "stages[0].steps: 3 -> 2; stages[1].steps: 1 -> 4")


def test_class_names_are_found_from_a_runs_own_directories_only(tmp_path):
  run = tmp_path / "run"
  for sub in ("checkpoints/30/state", "stages/head/checkpoints/10"):
    (run / sub).mkdir(parents=True)
  workdir.write_class_names(str(run), ["cat", "dog"])
  for path in (run, run / "checkpoints", run / "checkpoints" / "30", run / "stages" / "head",
               run / "stages" / "head" / "checkpoints" / "10"):
    assert workdir.recorded_class_names(path) == ["cat", "dog"], path
  # A directory that only sits inside a run (not one of its own) does not borrow its names.
  (run / "elsewhere").mkdir()
  assert workdir.recorded_class_names(run / "elsewhere") is None
  assert workdir.recorded_class_names(tmp_path) is None


def test_the_result_of_a_finished_run_is_read_back_from_its_checkpoints(tmp_path):
  def save(directory, step, accuracy, **options):
    with checkpoint.Checkpointer(directory, async_save=False, best_metric="eval/accuracy",
                                 **options) as ckpt:
      ckpt.save(step, {"w": np.zeros(2)}, extra={"stage": "x"},
                metrics={"eval/accuracy": accuracy})
  run = tmp_path / "run"
  save(run, 6, 0.75, total_steps=6)
  assert checkpoint.recorded_total_steps(run, 6) == 6
  # A staged run keeps each finished stage; a run without result.json (written
  # before it existed, or killed just before) is rebuilt from them, in step order.
  save(run / "stages" / "probe", 4, 0.5)
  save(run / "stages" / "all", 6, 0.75)
  assert workdir.finished_result(run, 6) == {
      "step": 6, "eval/accuracy": 0.75,
      "stages": {"probe": {"eval/accuracy": 0.5}, "all": {"eval/accuracy": 0.75}}}
  assert list(workdir.finished_result(run, 6)["stages"]) == ["probe", "all"]
  # A result.json of that step is the result as it was returned.
  (run / "result.json").write_text(json.dumps({"metrics": {"step": 6, "start": "scratch"}}))
  assert workdir.finished_result(run, 6) == {"step": 6, "start": "scratch"}
