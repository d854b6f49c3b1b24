"""A run's workdir (workdir.py): config.json written once, the is-a-file checks."""

import json
import os

import jax
import pytest

from tlflax import defaults
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
