"""The optimizer: partition groups, exact multipliers, decay masks, clipping, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tlflax import freeze, models, optim

IMAGES = jnp.zeros((1, 32, 32, 3))


@pytest.fixture(scope="module")
def params():
  model = models.get_model("cifar_resnet20")
  return model.init(jax.random.key(0), IMAGES)["params"]


def array_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and x.ndim > 0]


def ones_like(tree):
  return jax.tree.map(jnp.ones_like, tree)


@pytest.mark.parametrize("full_tree", [False, True])
def test_frozen_parameters_hold_no_optimizer_state(params, full_tree):
  freezing = freeze.compile_rules(freeze.freeze_depth(("stem", "stage1", "stage2", "stage3"), 2),
                                  params)
  tx = optim.make_optimizer({"name": "adamw", "learning_rate": 1e-3}, freezing, 10,
                            full_tree=full_tree)
  tree = params if full_tree else freezing.split(params)[0]
  state = tx.init(tree)
  trainable_size = sum(np.prod(freezing.shapes[p]) for p in freezing.trainable_paths)
  # Adam keeps two moments per trainable parameter and nothing else of size.
  assert sum(x.size for x in array_leaves(state)) == 2 * trainable_size
  if full_tree:
    assert isinstance(state.inner_states["frozen"].inner_state, optax.EmptyState)


def test_learning_rate_multipliers_scale_the_update_exactly(params):
  rules = [("stem/.*", 0.25), ("stage1/.*", 0.5), ("stage2/.*", "frozen"), (".*", "trainable")]
  freezing = freeze.compile_rules(rules, params)
  config = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.0, "schedule": "constant"}
  tx = optim.make_optimizer(config, freezing, 10)
  trainable, _ = freezing.split(params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  assert np.all(np.asarray(updates["stem"]["conv"]["kernel"]) == np.float32(-0.1 * 0.25 * 0.5))
  assert np.all(np.asarray(updates["stage1"]["block1"]["conv1"]["kernel"])
                == np.float32(-0.1 * 0.5 * 0.5))
  assert np.all(np.asarray(updates["stage3"]["block1"]["conv1"]["kernel"])
                == np.float32(-0.1 * 0.5))
  assert "stage2" not in updates


def test_weight_decay_skips_biases_and_batchnorm(params):
  freezing = freeze.compile_rules(freeze.full_fine_tuning(), params)
  config = {"name": "sgd", "learning_rate": 1.0, "momentum": 0.0, "weight_decay": 0.1,
            "schedule": "constant"}
  tx = optim.make_optimizer(config, freezing, 10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * params["head"]["kernel"],
                             rtol=1e-6)
  assert not np.any(updates["head"]["bias"])
  assert not np.any(updates["stem"]["bn"]["scale"])


def test_clipping_counts_trainable_gradients_only(params):
  freezing = freeze.compile_rules(freeze.linear_probe(), params)
  config = {"name": "sgd", "learning_rate": 1.0, "momentum": 0.0, "grad_clip_norm": 1.0,
            "schedule": "constant"}
  full = optim.make_optimizer(config, freezing, 10, full_tree=True)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1000.0), params)  # huge frozen grads
  grads["head"] = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params["head"])
  updates, _ = full.update(grads, full.init(params), params)
  # The head's gradient norm is below 1, so it is not clipped by the frozen ones.
  np.testing.assert_allclose(updates["head"]["kernel"], -1e-3, rtol=1e-6)
  assert not any(np.any(x) for x in jax.tree.leaves(updates["stem"]))


def test_warmup_cosine_schedule():
  schedule = optim.schedule_fn({"learning_rate": 1.0, "warmup_steps": 10}, 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)


def test_unknown_settings_fail_loudly(params):
  freezing = freeze.compile_rules(freeze.full_fine_tuning(), params)
  with pytest.raises(ValueError, match="Unknown optimizer settings \\['learning_rat'\\]"):
    optim.make_optimizer({"learning_rat": 0.1}, freezing, 10)
  with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
    optim.make_optimizer({"name": "lamb"}, freezing, 10)
