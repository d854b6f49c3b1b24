"""Staged fine-tuning: stage plans, optimizer-state carry-over, exact resume."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
# Imported before TensorFlow loads (see test_train.py).
import torch  # pylint: disable=unused-import
import torchvision  # pylint: disable=unused-import

from test_train import assert_trees_equal, load_config
from tlflax import build, defaults, freeze, models, stages, training
from tlflax.training import checkpoint, preemption
from tlflax.tree import flatten

SMALL = ["--config.batch_size=16", "--config.eval_batch_size=32", "--config.log_every_steps=1",
         "--config.model.name=cifar_resnet20", "--config.checkpoint_every_steps=100",
         "--config.eval_every_steps=100"]
LP_FT = stages.lp_ft(3, 3, probe_learning_rate=0.1, fine_tune_learning_rate=0.02, unit="steps")


def staged_config(stage_list=LP_FT, *overrides):
  config = load_config("digits.py", *SMALL, *overrides)
  config.stages = stage_list
  return config


# ----------------------------------------------------------------------------
# Plans and recipes
# ----------------------------------------------------------------------------

def test_plan_tiles_the_steps_and_merges_optimizer_settings():
  config = staged_config([
      {"name": "head", "epochs": 2, "freeze": "linear_probe", "learning_rate": 0.1},
      {"name": "all", "steps": 7, "freeze": "none", "warmup_steps": 2,
       "optimizer": {"name": "adamw"}, "reset_optimizer": True}])
  plan = stages.plan(config, steps_per_epoch=5, total_steps=999)
  assert [(s.name, s.start, s.end) for s in plan] == [("head", 0, 10), ("all", 10, 17)]
  assert plan[0].optimizer.learning_rate == 0.1 and plan[0].optimizer.name == "sgd"
  assert plan[1].optimizer.name == "adamw" and plan[1].optimizer.warmup_steps == 2
  assert plan[1].optimizer.learning_rate == config.optimizer.learning_rate
  assert plan[1].reset_optimizer and not plan[0].reset_optimizer
  # A state at a boundary belongs to the stage that ended there.
  assert stages.stage_of_state(plan, 10).name == "head"
  assert stages.stage_of_next_step(plan, 10).name == "all"
  assert stages.stage_of_state(plan, 0).name == "head"


def test_without_stages_the_run_is_one_stage():
  config = load_config("digits.py", *SMALL, "--config.freeze.rules=depth:1")
  (only,) = stages.plan(config, steps_per_epoch=5, total_steps=12)
  assert (only.start, only.end, only.freeze) == (0, 12, "depth:1")


@pytest.mark.parametrize("bad, message", [
    ({"name": "a", "steps": 2, "lr": 0.1}, "Stage 0 \\('a'\\) has unknown key 'lr'; a stage "
     "takes name, steps, epochs, freeze, optimizer, "),
    ({"name": "a", "steps": 2, "learning_rte": 0.1}, "Stage 0 \\('a'\\) has unknown key "
     "'learning_rte'; did you mean 'learning_rate'\\?$"),
    ({"name": "a", "steps": 2, "momentum": 0.5}, "unknown key 'momentum'; optimizer settings "
     "go under 'optimizer', e.g. {'optimizer': {'momentum': ...}}"),
    ({"name": "a", "steps": 2, "epochs": 1}, "exactly one of 'steps' or 'epochs'"),
    ({"name": "a"}, "exactly one of 'steps' or 'epochs'"),
    ({"name": "a", "steps": 0}, "steps=0: steps is the stage's length in steps; use a whole "
     "number >= 1"),
    ({"name": "a", "epochs": 0.01}, "is 0 steps long \\(0.01 epochs of 5 steps\\); give it at "
     "least one step"),
    ({"name": "a", "steps": 2, "optimizer": {"momentun": 0.5}}, "unknown optimizer key "
     "'momentun'; did you mean 'momentum'"),
    ({"name": "a", "steps": 2, "learning_rate": -0.1}, "Stage 0 \\('a'\\): learning_rate=-0.1: "
     "learning_rate is the peak learning rate; use a number > 0.$"),
    ({"name": "a", "steps": 2, "optimizer": {"b2": 1.0}}, "b2=1.0: b2 is AdamW's "),
])
def test_bad_stages_are_explained(bad, message):
  config = staged_config([bad])
  with pytest.raises(defaults.ConfigError, match=message):
    stages.plan(config, 5, 10)


def test_duplicate_stage_names_are_refused():
  config = staged_config([{"name": "a", "steps": 1}, {"name": "a", "steps": 1}])
  with pytest.raises(ValueError, match="unique"):
    stages.plan(config, 5, 10)


def test_recipes():
  names = models.get_model("cifar_resnet20").stage_names
  gradual = stages.gradual_unfreezing(num_stages=3, phase_length=1, learning_rate=0.1)
  assert [s["freeze"] for s in gradual] == ["linear_probe", "depth:2", "depth:1", "depth:0", "none"]
  variables = jax.eval_shape(models.get_model("cifar_resnet20").init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  trainable = []
  for phase in gradual:
    rules = freeze.rules_from_spec(phase["freeze"], names)
    compiled = freeze.compile_rules(rules, variables["params"])
    trainable.append({p.split("/")[0] for p in compiled.trainable_paths})
  assert trainable == [{"head"}, {"head", "stage3"}, {"head", "stage3", "stage2"},
                       {"head", "stage3", "stage2", "stage1"},
                       {"head", "stage3", "stage2", "stage1", "stem"}]
  delayed = stages.delayed_backbone(release_at=2, total_length=5, learning_rate=0.1,
                                    backbone_multiplier=0.1)
  rules = freeze.rules_from_spec(delayed[1]["freeze"], names)
  compiled = freeze.compile_rules(rules, variables["params"])
  assert compiled.path_multiplier["head/kernel"] == 1.0
  assert compiled.path_multiplier["stem/conv/kernel"] == pytest.approx(0.1)
  assert [d["epochs"] for d in delayed] == [2, 3]
  with pytest.raises(ValueError, match="inside the run"):
    stages.delayed_backbone(release_at=5, total_length=5, learning_rate=0.1)


# ----------------------------------------------------------------------------
# Optimizer state between stages
# ----------------------------------------------------------------------------

PARAMS = {"stem": {"kernel": jnp.ones((2, 3))}, "stage1": {"kernel": jnp.ones((3,))},
          "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}}


def compiled(rules):
  return freeze.compile_rules(rules, PARAMS)


def optimizer(freezing, name="sgd", total=10, **options):
  config = ml_collections.ConfigDict({"name": name, "learning_rate": 0.1, **options})
  stage = stages.Stage("s", 0, 0, total, None, config)
  return stages.make_stage_optimizer(stage, freezing)


def run_updates(tx, freezing, count):
  trainable, _ = freezing.split(PARAMS)
  state = tx.init(trainable)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), trainable)
  for _ in range(count):
    _, state = tx.update(grads, state, trainable)
  return state


def leaves_by_path(state):
  return {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_state_carries_for_parameters_trainable_in_both_stages(name):
  head_only = compiled(freeze.linear_probe())
  everything = compiled(freeze.backbone_multiplier(0.1))  # head x1, the rest x0.1
  old = run_updates(optimizer(head_only, name), head_only, count=3)
  new_tx = optimizer(everything, name)
  fresh = new_tx.init(everything.split(PARAMS)[0])
  carried = stages.carry_optimizer_state(old, head_only, fresh, everything)
  assert jax.tree.structure(carried) == jax.tree.structure(fresh)

  slot = "trace" if name == "sgd" else "mu"
  old_leaves, new_leaves = leaves_by_path(old), leaves_by_path(carried)
  head_slot = [v for k, v in new_leaves.items() if f".{slot}['head']['kernel']" in k]
  old_head = [v for k, v in old_leaves.items() if f".{slot}['head']['kernel']" in k]
  np.testing.assert_array_equal(head_slot[0], old_head[0])
  assert np.all(np.asarray(old_head[0]) != 0)
  # Newly unfrozen parameters start from the fresh (zero) state.
  stem_slot = [v for k, v in new_leaves.items() if f".{slot}['stem']['kernel']" in k]
  np.testing.assert_array_equal(stem_slot[0], np.zeros((2, 3)))
  # Every stage's schedule starts at its own first step.
  schedules = [s for s in jax.tree.leaves(carried, is_leaf=stages._is_schedule)
               if isinstance(s, optax.ScaleByScheduleState)]
  assert schedules and all(int(s.count) == 0 for s in schedules)
  if name == "adamw":  # bias correction continues for the group fed by the old head group
    counts = {k: int(v) for k, v in new_leaves.items() if k.endswith("[0].count")}
    assert counts == {k: (3 if "lr_x1'" in k else 0) for k in counts}

  reset = stages.carry_optimizer_state(old, head_only, fresh, everything, reset=True)
  for a, b in zip(jax.tree.leaves(reset), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(a, b)


def test_carried_state_follows_a_parameter_into_another_group():
  first = compiled([("head/.*", 1.0), ("stage1/.*", 1.0), (".*", "frozen")])
  second = compiled([("head/.*", 1.0), ("stage1/.*", 0.5), (".*", 0.1)])
  old = run_updates(optimizer(first), first, count=2)
  carried = stages.carry_optimizer_state(old, first, optimizer(second).init(
      second.split(PARAMS)[0]), second)
  leaves = leaves_by_path(carried)
  (moved,) = [v for k, v in leaves.items() if "'lr_x0.5'" in k and "stage1" in k]
  (before,) = [v for k, v in leaves_by_path(old).items() if "stage1" in k]
  np.testing.assert_array_equal(moved, before)


# ----------------------------------------------------------------------------
# Staged runs end to end
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("staged") / "run")
  result = training.train_and_evaluate(staged_config(), workdir)
  return workdir, result


def test_staged_run_freezes_per_stage_and_keeps_each_stage(uninterrupted):
  workdir, result = uninterrupted
  assert result["step"] == 6 and set(result["stages"]) == {"linear_probe", "fine_tune"}
  config = staged_config()
  initial = build.build(config, num_classes=5, image_size=32).variables
  after_probe = checkpoint.restore_params_only(os.path.join(workdir, "stages", "linear_probe"))
  final = checkpoint.restore_params_only(workdir)
  # Stage 1 trained the head only; its BatchNorm statistics did not move.
  for collection in ("params", "batch_stats"):
    for path, value in flatten(initial[collection]).items():
      saved = flatten(after_probe[collection])[path]
      if path.startswith("head/"):
        assert not np.array_equal(saved, value), path
      else:
        np.testing.assert_array_equal(saved, value, err_msg=path)
  # Stage 2 trained everything.
  changed = [p for p, v in flatten(final["params"]).items()
             if not np.array_equal(v, flatten(after_probe["params"])[p])]
  assert len(changed) == len(flatten(final["params"]))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    stage_of_step = {r["step"]: r["stage"] for r in map(json.loads, f) if "stage" in r}
  assert stage_of_step == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}


def test_preempted_in_stage_two_resumes_bit_identical(uninterrupted, tmp_path, monkeypatch):
  workdir = str(tmp_path / "preempted")
  monkeypatch.setattr(preemption, "preemption_requested", lambda step=None: step == 5)
  stopped = training.train_and_evaluate(staged_config(), workdir)
  assert stopped == {"step": 5, "preempted": True, "signal": "SIGTERM", "start": "scratch",
                     "stage": "fine_tune"}
  monkeypatch.undo()
  resumed = training.train_and_evaluate(staged_config(), workdir)
  assert resumed["start"] == "resumed" and resumed["step"] == 6
  reference_dir, reference = uninterrupted
  assert_trees_equal(checkpoint.restore_params_only(workdir),
                     checkpoint.restore_params_only(reference_dir))
  assert resumed["eval/accuracy"] == reference["eval/accuracy"]
  assert resumed["stages"] == reference["stages"]  # stage 1's from its kept checkpoint
  # The optimizer state (stage 2's momentum) is bit-identical too.
  resumed_slots = leaves_by_path(saved_state(workdir, 6)["opt_state"])
  reference_slots = leaves_by_path(saved_state(reference_dir, 6)["opt_state"])
  assert resumed_slots.keys() == reference_slots.keys() and len(resumed_slots) > 10
  for key, value in reference_slots.items():
    np.testing.assert_array_equal(resumed_slots[key], value, err_msg=key)


def saved_state(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))


def test_changed_stages_refuse_to_resume(tmp_path):
  workdir = str(tmp_path / "changed")
  training.train_and_evaluate(staged_config(stages.lp_ft(3, 1, 0.1, 0.02, unit="steps")), workdir)
  changed = staged_config(stages.lp_ft(2, 4, 0.1, 0.02, unit="steps"))
  # Finished: other stages are other settings, refused before anything is built.
  with pytest.raises(checkpoint.CheckpointError, match=r"finished run \(step 4 of 4\).*"
                     r"stages\[0\]\.steps: 3 -> 2"):
    training.train_and_evaluate(changed, workdir)
  # Stopped at step 3 (the last checkpoint removed): step 3 now falls in
  # another stage, whose optimizer state the checkpoint does not hold.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  with pytest.raises(checkpoint.CheckpointError, match="stages changed|does not fit"):
    training.train_and_evaluate(changed, workdir)


def test_copying_the_first_stages_only(uninterrupted):
  """`init.up_to_stage`: the split experiments copy stem ... stage k and re-initialise the rest."""
  workdir, _ = uninterrupted
  config = staged_config()
  config.init.weights, config.init.source, config.init.up_to_stage = workdir, "workdir", "stage1"
  built = build.build(config, num_classes=5, image_size=32)
  copied, start = built.variables, built.start
  config.init.weights = ""
  fresh = build.build(config, num_classes=5, image_size=32).variables
  source = checkpoint.restore_params_only(workdir)
  assert start == "pretrained"
  for collection in ("params", "batch_stats"):
    for path, value in flatten(copied[collection]).items():
      expected = (flatten(source[collection]) if path.split("/")[0] in ("stem", "stage1")
                  else flatten(fresh[collection]))[path]
      np.testing.assert_array_equal(value, expected, err_msg=path)
  config.init.weights, config.init.up_to_stage = workdir, "stage7"
  with pytest.raises(ValueError, match="up_to_stage='stage7'.*stage3"):
    build.build(config, num_classes=5, image_size=32)
