"""Train steps: frozen means frozen (bit-identical), and frozen parts cost no backward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax import freeze, models, optim, steps
from tlflax.data import images


def make_batch(size=32, batch=8, classes=10, seed=0):
  images = jax.random.normal(jax.random.key(seed), (batch, size, size, 3))
  return {"image": images, "label": jnp.arange(batch) % classes}


def setup(name, spec, optimizer=None, batchnorm_mode="frozen_layers", size=32, **options):
  model = models.get_model(name, num_classes=10, **options)
  batch = make_batch(size)
  variables = model.init(jax.random.key(1), batch["image"])
  # Non-trivial running statistics, so that an update would show.
  variables["batch_stats"] = jax.tree.map(lambda x: x + 0.1, variables["batch_stats"])
  freezing = freeze.compile_rules(freeze.rules_from_spec(spec, model.stage_names),
                                  variables["params"], batchnorm_mode=batchnorm_mode)
  tx = optim.make_optimizer(optimizer or {"name": "adamw", "learning_rate": 1e-2},
                            freezing, 100)
  state = steps.create_train_state(variables, tx, freezing)
  return model, freezing, tx, state, batch


def identical(a, b):
  return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def test_frozen_parameters_and_statistics_stay_bit_identical():
  model, freezing, tx, start, batch = setup("cifar_resnet20", "depth:2")
  train_step = jax.jit(steps.make_train_step(model, tx, freezing))
  state = start
  for seed in range(4):
    state, metrics = train_step(state, make_batch(seed=seed))
  assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))

  trainable_before, frozen_before = freezing.split(start.params)
  trainable_after, frozen_after = freezing.split(state.params)
  assert identical(frozen_before, frozen_after)
  assert all(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(trainable_before), jax.tree.leaves(trainable_after)))
  for stage in ("stem", "stage1", "stage2"):
    assert identical(start.batch_stats[stage], state.batch_stats[stage])
  assert not identical(start.batch_stats["stage3"], state.batch_stats["stage3"])
  # No optimizer state for frozen parameters: Adam's moments cover trainable ones only.
  trainable_size = sum(x.size for x in jax.tree.leaves(trainable_before))
  state_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert state_size == 2 * trainable_size


def test_all_batchnorm_statistics_can_stay_frozen():
  model, freezing, tx, start, batch = setup("cifar_resnet20", "none", batchnorm_mode="all")
  state, _ = jax.jit(steps.make_train_step(model, tx, freezing))(start, batch)
  assert identical(start.batch_stats, state.batch_stats)
  assert not identical(start.params, state.params)


def test_frozen_layers_statistics_may_adapt():
  model, freezing, tx, start, batch = setup("cifar_resnet20", "depth:1", batchnorm_mode="none")
  state, _ = jax.jit(steps.make_train_step(model, tx, freezing))(start, batch)
  assert not identical(start.batch_stats["stem"], state.batch_stats["stem"])
  assert identical(freezing.split(start.params)[1], freezing.split(state.params)[1])


def test_surgical_middle_stage():
  model, freezing, tx, start, batch = setup("cifar_resnet20", "surgical:stage2")
  state, metrics = jax.jit(steps.make_train_step(model, tx, freezing))(start, batch)
  for stage in ("stem", "stage1", "stage3"):
    assert identical(start.params[stage], state.params[stage])
  assert not identical(start.params["stage2"], state.params["stage2"])
  assert set(k for k in metrics if k.startswith("update_norm/")) == {"update_norm/lr_x1"}


def test_jitted_step_equals_plain_step():
  # SGD: Adam's first step is about lr * sign(g), which magnifies float noise.
  model, freezing, tx, start, batch = setup(
      "cifar_resnet20", "depth:1", optimizer={"name": "sgd", "learning_rate": 0.1})
  train_step = steps.make_train_step(model, tx, freezing)
  jitted_state, jitted_metrics = jax.jit(train_step)(start, batch)
  plain_state, plain_metrics = train_step(start, batch)
  np.testing.assert_allclose(jitted_metrics["loss"], plain_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jitted_state.params), jax.tree.leaves(plain_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_dropout_key_argument_draws_the_seeds_masks_from_a_seed_free_program():
  """Sweeps pass `jax.random.key(seed)` so that their seeds share one compiled step."""
  model, freezing, tx, state, batch = setup("efficientnet_lite0", "none")  # dropout 0.2
  step = jax.jit(steps.make_train_step(model, tx, freezing, dropout_seed=3))
  by_constant, _ = step(state, batch)
  by_argument, _ = step(state, batch, jax.random.key(3))
  assert identical(by_constant.params, by_argument.params)
  by_key_data, _ = step(state, batch, jax.random.key_data(jax.random.key(3)))  # what the loop passes
  assert identical(by_constant.params, by_key_data.params)
  by_other_key, _ = step(state, batch, jax.random.key(4))
  assert not identical(by_constant.params, by_other_key.params)  # the masks depend on the key
  programs = {step.lower(state, batch, jax.random.key(seed)).as_text() for seed in (3, 4)}
  assert len(programs) == 1


def test_everything_frozen_is_an_error():
  model = models.get_model("cifar_resnet20")
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  freezing = freeze.compile_rules([(".*", "frozen")], params["params"])
  with pytest.raises(ValueError, match="nothing to train"):
    steps.make_train_step(model, None, freezing)


def compiled_flops(function, *args):
  analysis = jax.jit(function).lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


@pytest.mark.parametrize("name", ["resnet18", pytest.param("vgg11_bn", marks=pytest.mark.slow)])
def test_flops_fall_with_freeze_depth_and_head_only_costs_a_forward(name):
  """XLA's own cost analysis of the compiled steps."""
  model, _, _, state, batch = setup(name, "none", size=32)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  forward = compiled_flops(lambda v, x: model.apply(v, x, train=False), variables,
                           batch["image"])
  depths = range(len([s for s in model.stage_names if s != "stem"]) + 1)
  flops = {}
  for spec in ["none"] + [f"depth:{k}" for k in depths]:
    model, freezing, tx, state, batch = setup(name, spec, size=32)
    flops[spec] = compiled_flops(steps.make_train_step(model, tx, freezing), state, batch)
  ordered = [flops[f"depth:{k}"] for k in depths]
  assert all(a > b for a, b in zip(ordered, ordered[1:])), ordered
  # Depth 0 freezes the stem (nothing for VGG, which has none).
  assert flops["none"] >= flops["depth:0"]
  head_only = flops[f"depth:{max(depths)}"]
  assert head_only < 1.05 * forward, (head_only, forward)
  assert flops["none"] > 2.5 * forward


def test_uint8_images_are_normalised_inside_the_step():
  """The step given uint8 pixels and the normaliser equals the step given normalised floats."""
  # SGD: Adam's first step is about lr * sign(g), which magnifies float noise.
  model, freezing, tx, state, _ = setup("resnet18", "depth:2",
                                        optimizer={"name": "sgd", "learning_rate": 0.1})
  pixels = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  labels = jnp.arange(8) % 10
  preprocessing = images.Preprocessing(crop_size=32, resize_size=32)
  on_host = jax.jit(steps.make_train_step(model, tx, freezing))(
      state, {"image": jnp.asarray(images.normalize(pixels, preprocessing)), "label": labels})
  prepare = functools.partial(images.normalize_on_device, preprocessing=preprocessing)
  on_device = jax.jit(steps.make_train_step(model, tx, freezing, prepare_images=prepare))(
      state, {"image": jnp.asarray(pixels), "label": labels})
  # Same loss and parameters up to float32 rounding: XLA may turn the division
  # by 255 into a multiplication by its reciprocal (last-bit differences in
  # the inputs), which a random network amplifies by at most ~1e2.
  np.testing.assert_allclose(on_device[1]["loss"], on_host[1]["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(on_device[0].params), jax.tree.leaves(on_host[0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
