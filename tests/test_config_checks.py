"""Configs are checked like flags: unknown keys, numbers that mean nothing, config files that raise.

Every case runs the command line as a user runs it (`tlflax.cli.train.main`,
the whole of `python -m tlflax.main`) and checks the one line on stderr, the
exit status, and that the workdir was never created; the Python API
(`train_and_evaluate`) is checked the same way. Last, `config.recipe` trains
a staged recipe from the command line.
"""

import json
import os
import textwrap

import numpy as np
import pytest
# Imported before any test loads TensorFlow (see test_train.py).
import torch  # pylint: disable=unused-import
import torchvision  # pylint: disable=unused-import

from test_cli_errors import DIGITS, REPO, SMALL, one_error_line, run
from test_train import load_config
from tlflax import build, defaults, stages, training
from tlflax.cli import app
from tlflax.cli import features as features_cli
from tlflax.cli import train as train_cli
from tlflax.training import checkpoint
from tlflax.tree import flatten


def config_file(tmp_path, body, name="my_config.py", extra=""):
  """A config file in tmp_path: configs/digits.py's config, then `body` inside get_config()."""
  path = tmp_path / name
  path.write_text(textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {os.path.join(REPO, "configs")!r})
      import digits

      def get_config():
        config = digits.get_config()
      """) + textwrap.indent(textwrap.dedent(body).rstrip("\n") + "\n", "  ")
      + "  return config\n"
      + textwrap.dedent(extra))
  return path


# -- Keys outside the schema ---------------------------------------------------


@pytest.mark.parametrize("line, key, nearest", [
    ("config.batch_sise = 32", "batch_sise", "batch_size"),
    ("config.data.imagesize = 64", "data.imagesize", "data.image_size"),
    ("config.learning_rate = 0.1", "learning_rate", "optimizer.learning_rate"),
    ("config.optimizer.momentun = 0.5", "optimizer.momentun", "optimizer.momentum"),
])
def test_a_key_a_config_file_sets_by_mistake_is_named_with_the_nearest(line, key, nearest,
                                                                       capsys, tmp_path):
  path = config_file(tmp_path, line)
  message = one_error_line(capsys, f"--config={path}", f"--workdir={tmp_path}/run", *SMALL)
  assert message == (f"{path} sets config.{key}, which is no config key; did you mean "
                     f"config.{nearest}? Every key is in tlflax/defaults.py.")
  assert not (tmp_path / "run").exists()


def test_a_sweep_point_with_an_unknown_key_names_the_point_and_the_nearest(capsys, tmp_path):
  path = config_file(tmp_path, "", extra="""
      def sweep():
        return [{"seed": 0}, {"name": "big", "data.imagesize": 64}]
      """)
  message = one_error_line(capsys, f"--config={path}", f"--workdir={tmp_path}/run", *SMALL)
  assert message == ("Point 'big' (sweep() entry 1) overrides unknown config key "
                     "'data.imagesize'. Did you mean data.image_size? Every key is in "
                     "tlflax/defaults.py.")
  assert not (tmp_path / "run").exists()


def test_a_sweep_point_with_a_number_out_of_range_names_the_point(capsys, tmp_path):
  path = config_file(tmp_path, "", extra="""
      def sweep():
        return [{"seed": 0}, {"name": "short", "num_train_steps": -5}]
      """)
  message = one_error_line(capsys, f"--config={path}", f"--workdir={tmp_path}/run", *SMALL)
  assert message.startswith("Point 'short' (sweep() entry 1): config.num_train_steps=-5: ")
  assert not (tmp_path / "run").exists()


def test_a_stage_with_an_unknown_key_names_the_stage_and_the_nearest(capsys, tmp_path):
  path = config_file(tmp_path, """\
      config.stages = [{"name": "head", "steps": 1, "freeze": "linear_probe"},
                       {"name": "all", "steps": 1, "learning_rte": 0.01}]
      """)
  message = one_error_line(capsys, f"--config={path}", f"--workdir={tmp_path}/run", *SMALL)
  assert message == "Stage 1 ('all') has unknown key 'learning_rte'; did you mean 'learning_rate'?"
  assert not (tmp_path / "run").exists()


def test_the_python_api_refuses_unknown_and_missing_keys_before_writing(tmp_path):
  config = load_config("digits.py", *SMALL)
  config.unlock()
  config.batch_sise = 32
  with pytest.raises(defaults.ConfigError, match=r"^the config sets config.batch_sise, which is "
                                                  r"no config key; did you mean "
                                                  r"config.batch_size\?"):
    training.train_and_evaluate(config, str(tmp_path / "run"))
  del config["batch_sise"]
  del config["keep_checkpoints"]
  with pytest.raises(defaults.ConfigError, match=r"^the config has no config.keep_checkpoints: "
                                                  r"start a config from "
                                                  r"tlflax.defaults.base_config\(\)"):
    training.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_the_features_command_checks_its_config_too(capsys, tmp_path):
  path = config_file(tmp_path, "config.data.imagesize = 64")
  status = features_cli.main([f"--config={path}", f"--output={tmp_path}/features"])
  lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tlflax.")]
  assert status == 1 and lines == [
      f"tlflax.cli.features: error: {path} sets config.data.imagesize, which is no config key; "
      "did you mean config.data.image_size? Every key is in tlflax/defaults.py."]
  assert not (tmp_path / "features").exists()


# -- Numbers that mean nothing -------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("num_train_steps=-5", "config.num_train_steps=-5: num_train_steps is the run's length in "
                           "steps (0: num_epochs sets it); use a whole number >= 0."),
    ("num_epochs=0", "config.num_epochs=0.0: num_epochs is the run's length in passes over the "
                     "training set (used when num_train_steps is 0); use a number > 0."),
    ("batch_size=0", "config.batch_size=0: batch_size is the images of one training step, over "
                     "all devices; use a whole number >= 1."),
    ("eval_batch_size=-8", "config.eval_batch_size=-8: eval_batch_size is the images of one "
                           "evaluation batch, over all devices; use a whole number >= 1."),
    ("optimizer.learning_rate=0", "config.optimizer.learning_rate=0.0: learning_rate is the peak "
                                  "learning rate; use a number > 0."),
    ("optimizer.learning_rate=nan", "config.optimizer.learning_rate=nan: learning_rate is the "
                                    "peak learning rate; use a number > 0."),
    ("optimizer.weight_decay=-0.1", "config.optimizer.weight_decay=-0.1: weight_decay is the "
                                    "weight decay (0: none); use a number >= 0."),
    ("optimizer.momentum=1.5", "config.optimizer.momentum=1.5: momentum is SGD's momentum (0: "
                               "none); use a number >= 0 and < 1."),
    ("log_every_steps=0", "config.log_every_steps=0: log_every_steps is the steps between logged "
                          "training metrics; use a whole number >= 1."),
    ("eval_every_steps=-1", "config.eval_every_steps=-1: eval_every_steps is the steps between "
                            "evaluations (0: once per epoch); use a whole number >= 0."),
    ("checkpoint_every_steps=-10", "config.checkpoint_every_steps=-10: checkpoint_every_steps is "
                                   "the steps between checkpoints (0: once per epoch); use a "
                                   "whole number >= 0."),
    ("keep_checkpoints=0", "config.keep_checkpoints=0: keep_checkpoints is how many recent "
                           "checkpoints are kept (the best one besides); use a whole number >= 1."),
    ("data.train_examples_per_class=-5", "config.data.train_examples_per_class=-5: "
                                         "train_examples_per_class is the training images used "
                                         "per class (0: all); use a whole number >= 0."),
    ("data.image_size=0", "config.data.image_size=0: image_size is the network's input size in "
                          "pixels; use a whole number >= 1."),
    ("label_smoothing=1.0", "config.label_smoothing=1.0: label_smoothing is the share of each "
                            "label spread over all classes; use a number >= 0 and < 1."),
])
def test_a_number_that_means_nothing_is_one_line_and_writes_nothing(override, message, capsys,
                                                                    tmp_path):
  got = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run",
                       f"--config.{override}")
  assert got == message
  assert not (tmp_path / "run").exists()


def test_every_default_lies_in_its_range():
  """The table names real keys, and the schema's defaults pass it."""
  config = defaults.base_config()
  for key, value_range in defaults.VALUE_RANGES.items():
    assert value_range.contains(defaults.value_at(config, key)), key
  defaults.check_config(config)


# -- Config files that raise -----------------------------------------------------


@pytest.mark.parametrize("body, error", [
    ("config.batch_size = bach_size", "NameError: name 'bach_size' is not defined"),
    ("raise RuntimeError('needs a GPU')", "RuntimeError: needs a GPU"),
    # Raised inside tlflax, called from the file: the line of the call.
    ("config.stages = stages.delayed_backbone(5, 5, 0.1)",
     "ValueError: release_at=5 must lie inside the run (0, 5)."),
])
def test_a_get_config_that_raises_is_one_line_with_its_file_and_line(body, error, capsys,
                                                                    tmp_path):
  path = config_file(tmp_path, "from tlflax import stages\n" + body)  # body: line 8
  argv = [f"--config={path}", f"--workdir={tmp_path}/run", *SMALL]
  status = train_cli.main(argv)
  err = capsys.readouterr().err
  assert status == app.USAGE and "Traceback" not in err
  assert [line for line in err.splitlines() if line.strip()] == [
      f"tlflax.main: error: {path}, line 8: {error} (raised inside get_config())"]
  # --debug shows the traceback: the error, raised from the file's own.
  with pytest.raises(app.ConfigFileError) as raised:
    train_cli.main([*argv, "--debug"])
  assert type(raised.value.__cause__).__name__ == error.split(":")[0]
  assert not (tmp_path / "run").exists()


def test_a_config_file_whose_import_raises_names_its_line(capsys, tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("SCALE = 1 / 0\n\ndef get_config():\n  pass\n")
  assert one_error_line(capsys, f"--config={path}", f"--workdir={tmp_path}/run", status=2) == (
      f"{path}, line 1: ZeroDivisionError: division by zero (raised while the file was "
      "imported)")
  assert not (tmp_path / "run").exists()


def test_a_sweep_function_that_raises_names_its_line(capsys, tmp_path):
  path = config_file(tmp_path, "pass", extra="""
      def sweep():
        return [{"seed": s} for s in seeds]
      """)  # sweep()'s return: line 11
  assert one_error_line(capsys, f"--config={path}", f"--workdir={tmp_path}/run", status=1) == (
      f"{path}, line 11: NameError: name 'seeds' is not defined (raised inside sweep())")
  assert not (tmp_path / "run").exists()


# -- Recipes as a config key -----------------------------------------------------


def test_recipe_stages_split_the_run():
  config = load_config("digits.py")
  config.recipe, config.recipe_head_fraction, config.recipe_head_learning_rate = "lp_ft", 0.3, 0.1
  probe, fine_tune = stages.plan(config, steps_per_epoch=5, total_steps=10)
  assert (probe.name, probe.end, probe.freeze, probe.optimizer.learning_rate) == (
      "linear_probe", 3, "linear_probe", 0.1)
  assert (fine_tune.name, fine_tune.start, fine_tune.end, fine_tune.freeze,
          fine_tune.optimizer.learning_rate) == ("fine_tune", 3, 10, "none", 0.05)
  config.recipe = "delayed_backbone"
  head, backbone = stages.plan(config, steps_per_epoch=5, total_steps=10)
  assert (head.end, backbone.end, backbone.freeze) == (3, 10, "backbone_lr:0.1")
  config.recipe = "gradual_unfreezing"  # 3 body stages: 5 phases, the last takes the rest
  plan = stages.plan(config, 5, 12, stage_names=("stem", "stage1", "stage2", "stage3"))
  assert [(s.freeze, s.num_steps) for s in plan] == [
      ("linear_probe", 2), ("depth:2", 2), ("depth:1", 2), ("depth:0", 2), ("none", 4)]


@pytest.mark.parametrize("overrides, message", [
    (["--config.recipe=lp-ft"], "config.recipe='lp-ft' is no recipe; did you mean 'lp_ft'? Use "
                                "one of lp_ft, gradual_unfreezing, delayed_backbone, or '' for "
                                "none."),
    (["--config.recipe=lp_ft", "--config.freeze.rules=depth:2"],
     "config.recipe='lp_ft' sets each stage's freezing itself, so "
     "config.freeze.rules='depth:2' would be ignored; "),
    (["--config.recipe=lp_ft", "--config.num_train_steps=1"],
     "config.recipe='lp_ft' trains two stages, one step each at least, but the run has 1 step"),
    (["--config.recipe=delayed_backbone", "--config.recipe_backbone_multiplier=0"],
     "config.recipe_backbone_multiplier=0.0: recipe_backbone_multiplier is delayed_backbone's "),
])
def test_recipes_that_cannot_run_are_refused(overrides, message, capsys, tmp_path):
  assert one_error_line(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run",
                        *overrides).startswith(message)
  assert not (tmp_path / "run").exists()


def test_a_recipe_and_stages_together_are_refused(capsys, tmp_path):
  path = config_file(tmp_path, "config.stages = [{'name': 'all', 'steps': 2}]")
  assert one_error_line(capsys, f"--config={path}", f"--workdir={tmp_path}/run", *SMALL,
                        "--config.recipe=lp_ft") == (
      "config.recipe='lp_ft' and config.stages both set the stages; set only one of them.")
  assert not (tmp_path / "run").exists()


def test_a_recipe_from_the_command_line_trains_its_stages(capsys, tmp_path):
  # The linear probe trains from the prefix cache, as a config.stages probe does.
  overrides = [*SMALL[1:], "--config.num_train_steps=4", "--config.recipe=lp_ft",
               "--config.recipe_head_fraction=0.5", "--config.recipe_head_learning_rate=0.1",
               "--config.data.augment=none", "--config.prefix_cache.enabled=True",
               f"--config.prefix_cache.directory={tmp_path}/cache"]
  workdir = tmp_path / "run"
  status, lines = run(capsys, DIGITS, f"--workdir={workdir}", *overrides)
  assert status == 0, lines
  assert (workdir / "stages" / "linear_probe").is_dir()
  assert (workdir / "stages" / "fine_tune").is_dir()
  cached = []
  for entry in os.listdir(tmp_path / "cache"):
    with open(tmp_path / "cache" / entry / "info.json", encoding="utf-8") as f:
      info = json.load(f)
    cached.append((info["stage"], info["split"]))
  assert sorted(cached) == [("stage3", "eval"), ("stage3", "train")]  # the probe's inputs
  with open(workdir / "config.json", encoding="utf-8") as f:
    recorded = json.load(f)
  assert (recorded["recipe"], recorded["stages"]) == ("lp_ft", [])
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    stage_of_step = {r["step"]: r["stage"] for r in map(json.loads, f) if "stage" in r}
  assert stage_of_step == {1: 0, 2: 0, 3: 1, 4: 1}
  # The linear probe left everything but the head bit-identical (BatchNorm statistics too).
  config = load_config("digits.py", *overrides)
  initial = build.build(config, num_classes=5, image_size=32).variables
  after_probe = checkpoint.restore_params_only(workdir / "stages" / "linear_probe")
  for collection in ("params", "batch_stats"):
    for path, value in flatten(initial[collection]).items():
      saved = flatten(after_probe[collection])[path]
      if path.startswith("head/"):
        assert not np.array_equal(saved, value), path
      else:
        np.testing.assert_array_equal(saved, value, err_msg=path)
  # The fine-tuning stage trained the backbone.
  final = checkpoint.restore_params_only(workdir)
  assert not np.array_equal(flatten(final["params"])["stem/conv/kernel"],
                            flatten(after_probe["params"])["stem/conv/kernel"])
