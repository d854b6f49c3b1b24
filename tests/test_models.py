"""Backbone structure: named stages, truncation, features, BatchNorm modes, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tlflax import models
from tlflax.models import layers

IMAGES = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

# Parameter counts of the torchvision originals (and the CIFAR paper's ResNet-20).
PARAMETER_COUNTS = {
    "resnet18": 11_689_512, "resnet50": 25_557_032, "resnext50_32x4d": 25_028_904,
    "wide_resnet50_2": 68_883_240, "vgg16": 138_357_544, "vgg11_bn": 132_868_840,
    "cifar_resnet20": 269_722,
}


def init(model, images=IMAGES):
  return model.init(jax.random.key(1), images)


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_match_originals(name):
  model = models.get_model(name)
  shapes = jax.eval_shape(lambda: init(model))
  assert count(shapes["params"]) == PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", models.model_names())
def test_every_model_has_named_stages_and_a_head(name):
  model = models.get_model(name)
  shapes = jax.eval_shape(lambda: init(model))
  top_level = set(shapes["params"])
  assert top_level == {n for n in model.stage_names if n in top_level} | {"head"}
  assert set(model.stage_names[1:]) <= top_level  # all but a parameter-free stem


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown model 'resnet51'.*resnet50"):
    models.get_model("resnet51")
  with pytest.raises(ValueError, match="Unknown dtype"):
    models.get_model("resnet18", dtype="float8")
  with pytest.raises(ValueError, match="last_stage='stage9'.*stage4"):
    init(models.get_model("resnet18", last_stage="stage9"))


def test_features_of_every_stage_and_pre_logits():
  model = models.get_model("resnet18", num_classes=5)
  variables = init(model)
  features = models.extract_features(model, variables, IMAGES)
  assert {k: v.shape for k, v in features.items()} == {
      "stem": (2, 8, 8, 64), "stage1": (2, 8, 8, 64), "stage2": (2, 4, 4, 128),
      "stage3": (2, 2, 2, 256), "stage4": (2, 1, 1, 512), "pre_logits": (2, 512),
      "logits": (2, 5)}
  # The pre-logit features are what the head sees.
  head = variables["params"]["head"]
  np.testing.assert_allclose(features["pre_logits"] @ head["kernel"] + head["bias"],
                             features["logits"], rtol=1e-5, atol=1e-5)
  # A head-less model returns those features directly.
  no_head = models.get_model("resnet18", num_classes=None)
  without = {"params": {k: v for k, v in variables["params"].items() if k != "head"},
             "batch_stats": variables["batch_stats"]}
  np.testing.assert_allclose(no_head.apply(without, IMAGES), features["pre_logits"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="stage7"):
    models.extract_features(model, variables, IMAGES, names=["stage7"])


def test_truncated_network_with_new_head():
  """Keep stem..stage2, put a new 3-class head on stage2's pooled output."""
  model = models.get_model("resnet50", num_classes=3, last_stage="stage2")
  variables = init(model)
  assert set(variables["params"]) == {"stem", "stage1", "stage2", "head"}
  assert variables["params"]["head"]["kernel"].shape == (512, 3)
  assert model.apply(variables, IMAGES).shape == (2, 3)
  vgg = models.get_model("vgg11", num_classes=4, last_stage="stage3")
  vgg_variables = init(vgg)
  assert set(vgg_variables["params"]) == {"stage1", "stage2", "stage3", "head"}
  assert vgg_variables["params"]["head"]["kernel"].shape == (256, 4)


def test_frozen_batchnorm_uses_running_statistics_under_train():
  model = models.get_model("resnet18", frozen_batchnorm=(r"stem/.*", r"stage1/.*"))
  variables = init(model)
  # Non-trivial running statistics, so "inference mode" is distinguishable.
  variables["batch_stats"] = jax.tree.map(lambda x: x + 0.3, variables["batch_stats"])
  _, state = model.apply(variables, IMAGES * 3.0, train=True, mutable=["batch_stats"])
  for stage in ("stem", "stage1"):
    assert jax.tree.all(jax.tree.map(np.array_equal, state["batch_stats"][stage],
                                     variables["batch_stats"][stage]))
  assert not np.array_equal(state["batch_stats"]["stage2"]["block1"]["bn1"]["mean"],
                            variables["batch_stats"]["stage2"]["block1"]["bn1"]["mean"])
  # The frozen stem computes exactly what inference mode computes.
  train_stem = models.extract_features  # inference features for comparison
  inference = train_stem(model, variables, IMAGES * 3.0, names=["stem"])["stem"]
  _, captured = model.apply(variables, IMAGES * 3.0, train=True,
                            mutable=["batch_stats", "intermediates"])
  np.testing.assert_array_equal(captured["intermediates"]["features"]["stem"], inference)


def test_bfloat16_compute_keeps_float32_parameters():
  model = models.get_model("resnet18", num_classes=10, dtype="bfloat16")
  variables = init(model)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  logits = model.apply(variables, IMAGES)
  assert logits.dtype == jnp.float32
  reference = models.get_model("resnet18", num_classes=10).apply(variables, IMAGES)
  assert np.max(np.abs(logits - reference)) < 0.1 * np.max(np.abs(reference))


@pytest.mark.parametrize("size, out", [(1, 7), (2, 7), (3, 7), (10, 7), (7, 7), (9, 4)])
def test_adaptive_avg_pool_matches_pytorch(size, out):
  x = np.random.RandomState(size).randn(2, size, size + 1, 3).astype(np.float32)
  expected = torch.nn.functional.adaptive_avg_pool2d(
      torch.from_numpy(x.transpose(0, 3, 1, 2)), (out, out)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), (out, out)),
                             expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size, kernel, stride, padding", [
    (2, 3, 1, 1), (1, 3, 1, 1), (4, 3, 2, 1), (3, 1, 1, 0), (4, 1, 2, 0), (7, 7, 2, 3),
    (16, 3, 1, 1)])  # the last one is big enough to keep XLA's convolution
def test_small_map_conv_equals_xla_convolution(size, kernel, stride, padding):
  rng = np.random.RandomState(size + kernel)
  x = jnp.asarray(rng.randn(2, size, size, 8), jnp.float32)
  w = jnp.asarray(rng.randn(kernel, kernel, 8, 5), jnp.float32)
  pads = ((padding, padding), (padding, padding))
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

  def ours(x, w):
    return layers.small_map_conv(x, w, (stride, stride), pads, dimension_numbers=numbers)

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), pads,
                                        dimension_numbers=numbers)

  np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
           for f in (ours, xla)]
  for a, b in zip(*grads):  # summation order differs: bound relative to the scale
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.max(np.abs(b))))
