"""Checkpoints: exact round trips, keeping the best, kills mid-save, clear errors."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import with_device_count
from tlflax import freeze, models, optim, steps
from tlflax.training import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGES = jnp.zeros((1, 32, 32, 3))
# Frozen stem, a slower stage1 and the rest at the base rate: three optimizer
# groups, so the state holds MaskedNode leaves and per-group namedtuples.
RULES = [("stem/.*", "frozen"), ("stage1/.*", 0.1), (".*", "trainable")]


@pytest.fixture(scope="module")
def variables():
  """Shapes only: tracing is much faster than running init on two shared cores."""
  model = models.get_model("cifar_resnet20", num_classes=3)
  return jax.eval_shape(model.init, jax.random.key(0), IMAGES)


def make_state(variables, optimizer="adamw", rules=RULES, seed=1):
  """A TrainState with a real optimizer's structure, filled with random values."""
  freezing = freeze.compile_rules(rules, variables["params"])
  config = {"name": optimizer, "learning_rate": 0.1, "weight_decay": 1e-4}
  tx = optim.make_optimizer(config, freezing, total_steps=10)
  shapes = jax.eval_shape(lambda: steps.create_train_state(variables, tx, freezing))
  return randomized(shapes, seed)


def randomized(shapes, seed):
  # numpy fills every leaf without compiling anything per shape.
  rng = np.random.default_rng(seed)
  def fill(leaf):
    if np.issubdtype(leaf.dtype, np.integer):
      return jnp.asarray(rng.integers(0, 1000, leaf.shape).astype(leaf.dtype))
    return jnp.asarray(rng.standard_normal(leaf.shape).astype(leaf.dtype))
  return jax.tree_util.tree_map(fill, shapes)


def tiny(value):
  return {"w": jnp.full((3,), value, jnp.float32)}


def test_round_trip_is_bit_identical_with_the_same_structure(tmp_path, variables):
  for optimizer in ("adamw", "sgd"):
    template = make_state(variables, optimizer, seed=1)
    state = make_state(variables, optimizer, seed=2)
    with checkpoint.Checkpointer(tmp_path / optimizer) as ckpt:
      ckpt.save(7, state, extra={"stage": 1, "stage_name": "head", "epoch": 3,
                                 "position": np.int64(640)})
      ckpt.wait()
      restored, extra = ckpt.restore(template)

    assert type(restored) is steps.TrainState
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    masked = [x for x in jax.tree_util.tree_leaves(
        restored.opt_state, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
              if isinstance(x, optax.MaskedNode)]
    assert masked, "the optimizer state should hold MaskedNode leaves"
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
      assert isinstance(got, jax.Array) and got.dtype == want.dtype
      assert got.sharding == want.sharding
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert extra == {"stage": 1, "stage_name": "head", "epoch": 3, "position": 640}


def test_keeps_the_last_checkpoints_and_the_best(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, best_metric="eval/accuracy",
                                 async_save=False)
  for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.4), (4, None), (5, 0.3), (6, float("nan"))]:
    ckpt.save(step, tiny(step), metrics=None if accuracy is None else {"eval/accuracy": accuracy})
  ckpt.close()
  # The best (step 2) outlives the last two; the others are deleted from disk.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "5", "6"]

  reopened = checkpoint.Checkpointer(tmp_path, keep=2, best_metric="eval/accuracy",
                                     async_save=False)
  assert reopened.best_step() == 2 and reopened.latest_step() == 6
  reopened.save(7, tiny(7.0), metrics={"eval/accuracy": 0.95})
  reopened.save(8, tiny(8.0))
  assert reopened.all_steps() == [7, 8] and reopened.best_step() == 7
  state, _ = reopened.restore(tiny(0.0), step=7)
  np.testing.assert_array_equal(state["w"], np.full((3,), 7.0, np.float32))
  reopened.close()


def test_lower_is_better_for_losses(tmp_path):
  assert checkpoint.resolve_best_mode("eval/loss") == "min"
  assert checkpoint.resolve_best_mode("eval/accuracy") == "max"
  assert checkpoint.resolve_best_mode("eval/loss", "max") == "max"
  with checkpoint.Checkpointer(tmp_path, keep=1, best_metric="eval/loss") as ckpt:
    for step, loss in [(1, 2.0), (2, 0.5), (3, 1.0), (4, 3.0)]:
      ckpt.save(step, tiny(step), metrics={"eval/loss": loss})
    # Known while the asynchronous saves may still be writing.
    assert ckpt.all_steps() == [2, 4] and ckpt.best_step() == 2
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_without_best_metric_only_the_last_are_kept(tmp_path):
  with checkpoint.Checkpointer(tmp_path, keep=2, best_metric="", async_save=False) as ckpt:
    for step in range(1, 5):
      ckpt.save(step, tiny(step), metrics={"eval/accuracy": 1.0 / step})
    assert ckpt.all_steps() == [3, 4] and ckpt.best_step() is None


def test_saving_the_latest_step_again_is_skipped_and_older_steps_refused(tmp_path):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    assert ckpt.save(5, tiny(1.0))
    assert not ckpt.save(5, tiny(2.0))
    with pytest.raises(ValueError, match="newer step 5"):
      ckpt.save(3, tiny(3.0))
    with pytest.raises(ValueError, match="JSON"):
      ckpt.save(6, tiny(3.0), extra={"array": np.zeros(3)})
    state, _ = ckpt.restore(tiny(0.0))
    np.testing.assert_array_equal(state["w"], np.ones(3, np.float32))


def test_unfinished_step_directories_are_ignored_and_cleaned_up(tmp_path):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, tiny(1.0))
  # What a run killed mid-save leaves: orbax's temporary directory, never renamed.
  partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000000000"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"\0" * 10)

  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    state, _ = ckpt.restore(tiny(0.0))
    np.testing.assert_array_equal(state["w"], np.ones(3, np.float32))
    # orbax deletes unfinished directories in the background; a save waits for it.
    assert ckpt.save(2, tiny(2.0))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def run_child(script: str, **popen_args) -> subprocess.Popen:
  # One device, and the user's other XLA flags kept (e.g. an imitated older CPU).
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), 1))
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **popen_args)


def test_a_run_killed_while_saving_restarts_from_the_last_complete_checkpoint(tmp_path):
  child = run_child(f"""
      import os, signal
      import jax.numpy as jnp, numpy as np
      from tlflax.training import checkpoint, preemption
      ckpt = checkpoint.Checkpointer({str(tmp_path)!r}, keep=3)
      ckpt.save(1, {{"w": jnp.ones((4,)), "big": jnp.zeros((16,))}}, extra={{"epoch": 1}})
      ckpt.wait()
      # The asynchronous save returns once its temporary directory exists; 64 MB
      # of incompressible data then takes a good fraction of a second to write.
      big = jnp.asarray(np.random.default_rng(0).standard_normal(16_000_000, np.float32))
      ckpt.save(2, {{"w": jnp.full((4,), 2.0), "big": big}}, extra={{"epoch": 2}})
      # Killing itself right away, rather than waiting for the test process to be
      # scheduled, makes sure the write is still under way.
      os.kill(os.getpid(), signal.SIGKILL)
      """)
  try:
    assert child.wait(timeout=60) == -signal.SIGKILL, child.stdout.read()
  finally:
    child.kill()
    child.stdout.close()
  names = os.listdir(tmp_path / "checkpoints")
  assert "2" not in names and any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names

  with checkpoint.Checkpointer(tmp_path, keep=3, async_save=False) as ckpt:
    assert ckpt.latest_step() == 1
    template = {"w": jnp.zeros((4,)), "big": jnp.zeros((16,))}
    state, extra = ckpt.restore(template)
    np.testing.assert_array_equal(state["w"], np.ones(4, np.float32))
    assert extra == {"epoch": 1}
    ckpt.save(2, state, extra={"epoch": 2})
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_restoring_another_freeze_stage_or_head_names_the_differences(tmp_path, variables):
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, make_state(variables))
    other_stage = make_state(variables, "sgd", [("stem/.*", "frozen"), (".*", "trainable")])
    with pytest.raises(checkpoint.CheckpointError, match="fresh workdir") as error:
      ckpt.restore(other_stage)
    assert "differences in: opt_state" in str(error.value)
    assert "opt_state/inner_states/lr_x0.1" in str(error.value)

    five_classes = jax.eval_shape(models.get_model("cifar_resnet20", num_classes=5).init,
                                  jax.random.key(0), IMAGES)
    with pytest.raises(checkpoint.CheckpointError) as error:
      ckpt.restore(make_state(five_classes))
    assert "params/head/kernel: checkpoint (64, 3) float32, this run (64, 5) float32" in str(
        error.value)


def test_bad_workdirs_and_missing_checkpoints_are_clear_errors(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("not a directory")
  with pytest.raises(checkpoint.CheckpointError, match="is a file"):
    checkpoint.Checkpointer(a_file)
  with checkpoint.Checkpointer(tmp_path / "empty") as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(checkpoint.CheckpointError, match="No complete checkpoint"):
      ckpt.restore(tiny(0.0))
  with pytest.raises(checkpoint.CheckpointError, match="No complete training checkpoint"):
    checkpoint.restore_params_only(tmp_path / "empty")
  with pytest.raises(checkpoint.CheckpointError, match="is a file"):
    checkpoint.restore_params_only(a_file)
  with pytest.raises(ValueError, match="keep"):
    checkpoint.Checkpointer(tmp_path / "w", keep=0)


def test_restore_params_only_needs_no_optimizer(tmp_path, variables):
  state = make_state(variables)
  with checkpoint.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state)
    ckpt.save(2, state.replace(params=jax.tree.map(jnp.zeros_like, state.params)))

  for path, step in [(tmp_path, 1), (tmp_path / "checkpoints", 1),
                     (tmp_path / "checkpoints" / "1", None)]:
    loaded = checkpoint.restore_params_only(path, step)
    assert sorted(loaded) == ["batch_stats", "params"]
    for name in loaded:
      for got, want in zip(jax.tree_util.tree_leaves(loaded[name]),
                           jax.tree_util.tree_leaves(getattr(state, name))):
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, np.asarray(want))
    assert (jax.tree_util.tree_structure(loaded["params"])
            == jax.tree_util.tree_structure(state.params))

  latest = checkpoint.restore_params_only(tmp_path)
  assert not np.any(latest["params"]["head"]["kernel"])
  with pytest.raises(checkpoint.CheckpointError, match="complete checkpoints: \\[1, 2\\]"):
    checkpoint.restore_params_only(tmp_path, step=9)


def test_relative_paths_work(tmp_path, variables, monkeypatch):
  """The README passes a relative --workdir; orbax itself wants absolute paths."""
  monkeypatch.chdir(tmp_path)
  state = make_state(variables)
  with checkpoint.Checkpointer("run", async_save=False) as ckpt:
    ckpt.save(1, state)
  loaded = checkpoint.restore_params_only("run")
  np.testing.assert_array_equal(loaded["params"]["head"]["kernel"],
                                np.asarray(state.params["head"]["kernel"]))
  restored, _ = checkpoint.Checkpointer("run").restore(state)
  assert int(restored.step) == int(state.step)
