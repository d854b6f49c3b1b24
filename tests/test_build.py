"""From a config to a model and its starting variables (build.py), on a tiny CIFAR ResNet."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax import build, defaults, freeze, models, optim, steps, weights
from tlflax.cli import train as train_cli
from tlflax.training import checkpoint
from tlflax.training import workdir as workdir_lib
from tlflax.tree import flatten, unflatten
from tlflax.weights import native

SEED = 3
HEAD = ["params/head/bias", "params/head/kernel"]


def make_config(**init):
  """The default config (cifar_resnet20 at 32 px) at SEED, with `init` keys set."""
  config = defaults.base_config()
  config.seed = SEED
  for key, value in init.items():
    setattr(config.init, key, value)
  config.lock()
  return config


def filled(model, seed):
  """Random variables with `model.init`'s structure, unlike any init (no compiling)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype), shapes)


def save_run(workdir, variables):
  """A training run's checkpoint of `variables`, as train.py writes it."""
  freezing = freeze.compile_rules([(".*", "trainable")], variables["params"])
  tx = optim.make_optimizer({"name": "sgd", "learning_rate": 0.1}, freezing, total_steps=1)
  with checkpoint.Checkpointer(workdir, async_save=False) as ckpt:
    ckpt.save(1, steps.create_train_state(variables, tx, freezing))
  return workdir


@pytest.fixture(name="runs", scope="module")
def fixture_runs(tmp_path_factory):
  """{classes: (workdir, flat variables)} of two training runs, with 5- and 10-class heads."""
  runs = {}
  for classes in (5, 10):
    variables = filled(models.get_model("cifar_resnet20", num_classes=classes), seed=classes)
    workdir = str(tmp_path_factory.mktemp("runs") / f"classes{classes}")
    runs[classes] = save_run(workdir, variables), flatten(variables)
    workdir_lib.write_class_names(workdir, [f"class{k}" for k in range(classes)])
  return runs


@pytest.fixture(name="source")
def fixture_source(runs):
  """The run with 5 classes (the tasks below have 10)."""
  return runs[5]


@pytest.fixture(name="scratch", scope="module")
def fixture_scratch():
  """`build` from scratch for 10 classes, flat."""
  built = build.build(make_config(), num_classes=10)
  assert built.start == "scratch" and built.report is None
  return flatten(built.variables)


def assert_flat_equal(got, want):
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert isinstance(got[key], np.ndarray), key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def body(flat):
  return {k: v for k, v in flat.items() if not k.startswith(("params/head/", "batch_stats/head/"))}


def test_make_model_follows_the_config_and_options():
  config = defaults.base_config()
  assert build.make_model(config, num_classes=5) == models.get_model(
      "cifar_resnet20", dtype="float32", num_classes=5)
  config.model.last_stage, config.model.dtype = "stage2", "bfloat16"
  assert build.make_model(config) == models.get_model("cifar_resnet20", dtype="bfloat16",
                                                       last_stage="stage2")
  # An option overrides the config's field.
  assert build.make_model(config, last_stage="stage1").last_stage == "stage1"


def test_from_scratch_the_variables_are_model_init_at_the_seed(scratch):
  model = models.get_model("cifar_resnet20", num_classes=10)
  # Eager (not jitted) init: the compiled initialisation draws the same numbers.
  expected = model.init(jax.random.key(SEED), jnp.zeros((1, 32, 32, 3)))
  assert_flat_equal(scratch, {k: np.asarray(v) for k, v in flatten(expected).items()})


def test_the_initialisation_is_compiled_once_per_model_and_size(scratch):
  config = make_config()
  config.unlock()
  config.seed = SEED + 1   # the seed is an argument, not a reason to compile again
  compiled = build.init_variables._cache_size()  # pylint: disable=protected-access
  other_seed = flatten(build.build(config, num_classes=10).variables)
  assert build.init_variables._cache_size() == compiled  # pylint: disable=protected-access
  assert sorted(other_seed) == sorted(scratch)
  kernel = "params/stem/conv/kernel"
  assert not np.array_equal(other_seed[kernel], scratch[kernel])


def test_pretrained_from_a_workdir_gets_everything_but_the_head(source, scratch):
  workdir, saved = source
  built = build.build(make_config(weights=workdir, source="workdir"), num_classes=10)
  assert built.start == "pretrained"
  variables = flatten(built.variables)
  assert_flat_equal(body(variables), body(saved))  # bit-identical
  assert_flat_equal({k: variables[k] for k in HEAD}, {k: scratch[k] for k in HEAD})  # fresh
  assert built.report == weights.MergeReport(loaded=sorted(body(saved)), reinitialised=HEAD,
                                             skipped=[])


def test_a_head_of_the_same_shape_is_new_unless_keep_head(runs, scratch):
  workdir, saved = runs[10]
  new_head = build.build(make_config(weights=workdir, source="workdir"), num_classes=10)
  assert_flat_equal(flatten(new_head.variables), {**body(saved), **{k: scratch[k] for k in HEAD}})
  assert new_head.report.reinitialised == HEAD

  kept = build.build(make_config(weights=workdir, source="workdir", keep_head=True),
                     num_classes=10)
  assert_flat_equal(flatten(kept.variables), saved)
  assert kept.report == weights.MergeReport(loaded=sorted(saved), reinitialised=[], skipped=[])


CLASSES = [f"class{k}" for k in range(10)]  # what the run with 10 classes recorded


def build_logged(caplog, config, class_names, num_classes=10):
  """`build` for a task with `class_names`; returns (flat variables, the head's log line)."""
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="tlflax.build"):
    built = build.build(config, num_classes=num_classes, class_names=class_names)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("Kept", "New"))]
  assert len(lines) == 1, lines
  return flatten(built.variables), lines[0]


def test_the_head_is_kept_when_it_predicts_the_tasks_classes(runs, scratch, caplog):
  workdir, saved = runs[10]
  config = make_config(weights=workdir, source="workdir")
  new_head = {**body(saved), **{k: scratch[k] for k in HEAD}}
  variables, line = build_logged(caplog, config, CLASSES)   # a run that continues the run
  assert_flat_equal(variables, saved)
  assert line == (f"Kept the head of {workdir} (classes class0, class1, class2, class3, class4, "
                  "class5, class6, class7, class8, class9).")
  variables, line = build_logged(caplog, config, [f"digit{k}" for k in range(10)])
  assert_flat_equal(variables, new_head)
  assert line.startswith("New head: the source's classes (class0, class1, ") and line.endswith(
      "are not this task's (digit0, digit1, digit2, digit3, digit4, digit5, digit6, digit7, "
      "digit8, digit9).")
  variables, line = build_logged(caplog, config, None)   # the task's classes are unknown
  assert_flat_equal(variables, new_head)
  assert line == ("New head: this task has no class names to match the head's 10 classes "
                  "with; config.init.keep_head=True keeps it.")
  # keep_head decides explicitly, whatever the names.
  variables, line = build_logged(
      caplog, make_config(weights=workdir, source="workdir", keep_head=False), CLASSES)
  assert_flat_equal(variables, new_head)
  assert line == "New head: config.init.keep_head=False."
  variables, line = build_logged(
      caplog, make_config(weights=workdir, source="workdir", keep_head=True), ["x"] * 10)
  assert_flat_equal(variables, saved)
  assert line == f"Kept the head of {workdir} (config.init.keep_head=True)."
  # Copying the first stages only never keeps the head.
  _, line = build_logged(
      caplog, make_config(weights=workdir, source="workdir", up_to_stage="stage3"), CLASSES)
  assert line == "New head: init.up_to_stage='stage3' copies the network up to that stage only."


def test_a_head_of_other_classes_or_of_unknown_classes_is_new(runs, scratch, caplog, tmp_path):
  workdir, saved = runs[5]
  variables, line = build_logged(caplog, make_config(weights=workdir, source="workdir"), CLASSES)
  assert_flat_equal(variables, {**body(saved), **{k: scratch[k] for k in HEAD}})
  assert line == "New head: the source's head has 5 classes, this task 10."
  # A run from before class names were recorded.
  unnamed = save_run(str(tmp_path / "unnamed"), unflatten(runs[10][1]))
  _, line = build_logged(caplog, make_config(weights=unnamed, source="workdir"), CLASSES)
  assert line == (f"New head: {unnamed} records no class names to match the head's 10 classes "
                  "with; config.init.keep_head=True keeps it.")


@pytest.mark.parametrize("task, how", [
    (CLASSES[::-1], "the same classes in another order"),
    (CLASSES[:9] + ["other"], "10 classes, some of them this task's"),
])
def test_the_same_number_of_classes_under_other_names_or_order_is_an_error(runs, task, how):
  workdir, _ = runs[10]
  with pytest.raises(weights.WeightsError) as raised:
    build.build(make_config(weights=workdir, source="workdir"), num_classes=10, class_names=task)
  assert str(raised.value) == (
      f"The head of {workdir} predicts {how}: its classes are {', '.join(CLASSES)}; this "
      f"task's are {', '.join(task)}. Set --config.init.keep_head=False for a new head, or "
      "--config.init.keep_head=True to keep this head as it is (its outputs keep the "
      "source's order).")


def test_the_class_names_of_weights_that_are_no_run(tmp_path):
  imagenet = build.source_class_names(make_config(weights="resnet18.tv_in1k"))
  assert len(imagenet) == 1000 and imagenet[0] == "tench"
  converted = tmp_path / "converted"
  converted.mkdir()
  (converted / "provenance.json").write_text(
      json.dumps({"format": native.FORMAT, "class_names": ["a", "b"]}))
  assert build.source_class_names(make_config(weights=str(converted), source="tlflax")) == [
      "a", "b"]
  # A weight file the registry does not know by name carries none.
  assert build.source_class_names(make_config(weights=str(tmp_path / "my.pth"),
                                              source="torchvision")) is None
  assert build.source_class_names(make_config()) is None


def test_keep_head_on_the_command_line_is_true_false_or_unset():
  config_file = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "digits.py")
  for given, expected in ((None, None), ("True", True), ("False", False), ("false", False)):
    argv = [f"--config={config_file}", "--workdir=unused"] + (
        [] if given is None else [f"--config.init.keep_head={given}"])
    values = train_cli.define_flags(argv)
    values([train_cli.PROGRAM, *argv])
    assert values.config.init.keep_head is expected, given
  config = defaults.base_config()
  config.init.keep_head = True   # a config file sets it as a plain bool
  assert config.init.keep_head is True


def test_up_to_stage_copies_the_stem_to_that_stage_only(source, scratch):
  workdir, saved = source
  built = build.build(make_config(weights=workdir, source="workdir", up_to_stage="stage1"),
                      num_classes=10)
  variables = flatten(built.variables)
  copied = {k for k in variables if k.split("/")[1] in ("stem", "stage1")}
  assert copied and any(k.startswith("batch_stats/stage1/") for k in copied)
  assert_flat_equal(variables, {k: saved[k] if k in copied else scratch[k] for k in variables})
  assert built.report.loaded == sorted(copied)
  assert built.report.reinitialised == sorted(set(variables) - copied)

  with pytest.raises(ValueError, match=r"init.up_to_stage='stage7' is not a stage of "
                                       r"cifar_resnet20; choose one of \['stem', 'stage1', "
                                       r"'stage2', 'stage3'\]"):
    build.build(make_config(weights=workdir, source="workdir", up_to_stage="stage7"), 10)


def test_read_weights_false_reads_nothing(tmp_path, scratch, monkeypatch):
  def no_reading(config):
    raise AssertionError("read_pretrained must not be called")
  monkeypatch.setattr(build, "read_pretrained", no_reading)
  config = make_config(weights=str(tmp_path / "missing"), source="workdir")
  built = build.build(config, num_classes=10, read_weights=False)
  assert built.start == "scratch" and built.report is None
  assert_flat_equal(flatten(built.variables), scratch)


def test_missing_weights_say_what_to_pass(tmp_path):
  missing = str(tmp_path / "missing.pth")
  with pytest.raises(weights.WeightsError,
                     match=(rf"^Weight file '{missing}' does not exist and is no known "
                            r"pretrained id\. Pass an existing file .*--config.init.weights=PATH"
                            r".*--config.init.source=workdir.*registry.list_ids\(\)")):
    build.read_pretrained(make_config(weights=missing, source="torchvision"))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"^With config.init.source='workdir', config.init.weights must be a "
                           r"training run's workdir: .*does not exist"):
    build.build(make_config(weights=str(tmp_path / "no_run"), source="workdir"), num_classes=10)
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"^With config.init.source='workdir'.*No complete training checkpoint"):
    build.read_pretrained(make_config(weights=str(tmp_path / "empty"), source="workdir"))
  assert build.read_pretrained(make_config()) is None


def test_extractor_of_a_body_stage_is_truncated_and_reads_only_what_it_needs(source):
  workdir, saved = source
  config = make_config(weights=workdir, source="workdir")
  built = build.build_extractor(config, "stage2")
  assert built.start == "pretrained"
  assert built.model == models.get_model("cifar_resnet20", num_classes=None,
                                         last_stage="stage2")
  needed = {k: v for k, v in saved.items() if k.split("/")[1] in ("stem", "stage1", "stage2")}
  assert needed and len(needed) < len(saved)
  assert_flat_equal(flatten(built.variables), needed)
  assert built.report == weights.MergeReport(loaded=sorted(needed), reinitialised=[], skipped=[])

  logits = build.build_extractor(config, "logits")  # the whole run, its own 5-class head
  assert logits.model.num_classes == 5
  assert_flat_equal(flatten(logits.variables), saved)


def test_extractor_without_weights_is_the_scratch_network_cut_short(scratch, caplog):
  built = build.build_extractor(make_config(), "stage1")
  assert built.start == "scratch" and built.report is None
  variables = flatten(built.variables)
  assert {k.split("/")[1] for k in variables} == {"stem", "stage1"}
  # Flax draws each layer's numbers from its own name: those of the whole network.
  assert_flat_equal(variables, {k: scratch[k] for k in variables})
  assert "No config.init.weights: features of a randomly initialised cifar_resnet20 (seed 3)" in (
      caplog.text)


def test_extractor_checks_the_stage_before_reading_any_weights(tmp_path, monkeypatch):
  def no_reading(config):
    raise AssertionError("read_pretrained must not be called")
  monkeypatch.setattr(build, "read_pretrained", no_reading)
  config = make_config(weights=str(tmp_path / "missing.pth"), source="torchvision")
  with pytest.raises(ValueError, match=r"^Unknown stage 'stage7' for 'cifar_resnet20'"):
    build.build_extractor(config, "stage7")
