"""Backbone structure: named stages, truncation, features, BatchNorm modes, dtypes."""

from typing import Any, Optional

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tlflax import models
from tlflax.models import base, layers, registry

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


def trace(model, images=IMAGES):
  """Shapes of every collection (features included), and the top-level call order.

  `params` keys come back sorted, so the order in which the stages run is
  read from the calls themselves: the top-level submodules, in call order.
  """
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and len(context.module.scope.path) == 1:
      if not calls or calls[-1] != context.module.name:
        calls.append(context.module.name)
    return next_fun(*args, **kwargs)

  def init_everything():
    with nn.intercept_methods(record):
      return model.init_with_output(jax.random.key(1), images, mutable=True)

  output, shapes = jax.eval_shape(init_everything)
  return output, shapes, calls


def expected_stages(name):
  """Each family's published stage boundaries, as its module documents them."""
  numbered = base.numbered_stages
  family = models.registry.family_of(models.get_model(name))
  if family is None:
    if "vgg" in name:  # no stem; the hidden dense layers are a stage
      return [*numbered(5), "fc"]
    return ["stem", *numbered(3 if "cifar" in name else 4)]
  return {
      "alexnet": [*numbered(3), "fc"],
      "convnext": ["stem", *numbered(4), "final_norm"],
      # torchvision's features[1..7] / Keras' block1..7, then the 1x1 "top" convolution;
      # EfficientNetV2-S has six stages.
      "efficientnet": ["stem", *numbered(6 if name == "efficientnet_v2_s" else 7), "top"],
      "efficientnet_lite": ["stem", *numbered(7), "top"],  # B0's stages, as Google builds Lite
      "inception": ["stem", *numbered(3)],  # Mixed_5x, Mixed_6x, Mixed_7x
      "xception": ["stem", *numbered(5)],  # 3 entry-flow blocks, the middle flow, the exit flow
      "vit": ["stem", *numbered(4)],  # the blocks in four groups
  }[family]


@pytest.mark.parametrize("name", models.model_names())
def test_every_model_is_a_backbone(name):
  """The declared contract, for every registered name (shapes only, no init)."""
  model = models.get_model(name)
  assert isinstance(model, models.Backbone)
  assert model.last_stage is None and model.input_stage is None
  assert model.frozen_batchnorm == () and model.dtype == jnp.float32
  assert isinstance(model.num_classes, int)
  stages = list(model.stage_names)
  assert stages == expected_stages(name)
  size = max(IMAGES.shape[1], getattr(model, "min_input_size", 0))
  output, shapes, calls = trace(model, jnp.zeros((2, size, size, 3)))
  # The stages are the top-level submodules with parameters, run in this
  # order, then the head (a parameter-free Dropout before it does not count).
  assert [c for c in calls if c in shapes["params"]] == stages + ["head"]
  assert set(shapes["params"]) == set(stages) | {"head"}
  assert output.shape == (2, model.num_classes)
  # Every stage is readable by its name, and so is what the head sees.
  assert set(shapes["intermediates"]["features"]) == set(stages) | {models.PRE_LOGITS}
  assert models.feature_names(model) == stages + [models.PRE_LOGITS, "logits"]


@pytest.mark.parametrize("name", ["resnet18", "cifar_resnet20", "vgg11_bn", "keras_resnet50",
                                  "keras_resnet50v2"])
def test_last_stage_and_input_stage_split_the_stages(name):
  """Truncating after a stage runs exactly the stages up to it; resuming after
  it runs exactly the rest, with the same variable names."""
  model = models.get_model(name)
  _, full, _ = trace(model)
  features = full["intermediates"]["features"]
  stages = list(model.stage_names)
  for i, stage in enumerate(stages[:-1]):
    _, prefix, prefix_calls = trace(model.clone(last_stage=stage))
    assert prefix_calls == stages[:i + 1] + ["head"]
    assert set(prefix["params"]) == set(stages[:i + 1]) | {"head"}
    cached = jnp.zeros(features[stage].shape, features[stage].dtype)
    _, rest, rest_calls = trace(model.clone(input_stage=stage), cached)
    assert rest_calls == stages[i + 1:] + ["head"]
    # The rest's variables are the full model's (same names and shapes).
    assert jax.tree.map(lambda x: (x.shape, x.dtype), rest["params"]) == {
        k: jax.tree.map(lambda x: (x.shape, x.dtype), full["params"][k])
        for k in stages[i + 1:] + ["head"]}
  with pytest.raises(ValueError, match="input_stage='stage1' must come before "
                                       "last_stage='stage1'"):
    trace(model.clone(last_stage="stage1", input_stage="stage1"))


class TinyBackbone(nn.Module):
  """A family defined outside the package, built from the declared helpers only."""
  num_classes: Optional[int] = 3
  last_stage: Optional[str] = None
  input_stage: Optional[str] = None
  frozen_batchnorm: tuple[str, ...] = ()
  dtype: Any = jnp.float32
  head_init: str = "lecun"

  @property
  def stage_names(self):
    return ("stem",) + base.numbered_stages(2)

  @nn.compact
  def __call__(self, x, train: bool = False):
    base.check_stages(self)
    for i, name in enumerate(self.stage_names):
      if not base.runs_stage(self, name):
        continue
      x = nn.relu(nn.Conv(4 * (i + 1), (3, 3), dtype=self.dtype, name=name)(x))
      layers.sow_feature(self, name, x)
      if name == self.last_stage:
        break
    return base.classifier_head(self, layers.global_avg_pool(x))


def test_a_new_family_needs_only_the_contract(monkeypatch):
  monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # undone after the test
  models.register("tiny", TinyBackbone)
  assert "tiny" in models.model_names()
  model = models.get_model("tiny", num_classes=2)
  assert isinstance(model, models.Backbone)
  images = IMAGES[:, :8, :8]
  features = models.extract_features(model, init(model, images), images)
  assert {k: v.shape for k, v in features.items()} == {
      "stem": (2, 8, 8, 4), "stage1": (2, 8, 8, 8), "stage2": (2, 8, 8, 12),
      "pre_logits": (2, 12), "logits": (2, 2)}
  assert models.feature_names(model.clone(last_stage="stage1", num_classes=None)) == [
      "stem", "stage1", "pre_logits"]


def test_what_is_not_a_backbone():
  assert not isinstance(nn.Dense(3), models.Backbone)

  class NoTruncation(nn.Module):  # has everything but `input_stage`
    num_classes: Optional[int] = 3
    last_stage: Optional[str] = None
    frozen_batchnorm: tuple[str, ...] = ()
    dtype: Any = jnp.float32
    stage_names = ("stem",)

  assert not isinstance(NoTruncation(), models.Backbone)


def test_public_names():
  assert sorted(models.__all__) == sorted([
      "Backbone", "LOGITS", "PRE_LOGITS", "check_stage", "extract_features", "feature_names",
      "get_model", "model_for_stage", "model_names", "register"])
  assert all(hasattr(models, name) for name in models.__all__)
  assert models.PRE_LOGITS == layers.PRE_LOGITS == "pre_logits"
  assert models.LOGITS == "logits"


def test_feature_names_follow_truncation_and_head():
  cifar = models.get_model("cifar_resnet20")
  assert models.feature_names(cifar) == ["stem", "stage1", "stage2", "stage3", "pre_logits",
                                         "logits"]
  assert models.feature_names(cifar.clone(last_stage="stage1")) == [
      "stem", "stage1", "pre_logits", "logits"]
  assert models.feature_names(cifar.clone(num_classes=None)) == [
      "stem", "stage1", "stage2", "stage3", "pre_logits"]
  assert models.feature_names(models.get_model("vgg11")) == [
      "stage1", "stage2", "stage3", "stage4", "stage5", "fc", "pre_logits", "logits"]
  # "" is no stage: a config's empty last_stage must not be passed on.
  with pytest.raises(ValueError, match=r"last_stage='' is not a stage of this model; "
                                       r"choose one of \['stem', 'stage1'"):
    models.feature_names(cifar.clone(last_stage=""))


def test_check_stage_lists_the_choices():
  cifar = models.get_model("cifar_resnet20")
  for stage in models.feature_names(cifar):
    models.check_stage(cifar, stage)
  with pytest.raises(ValueError) as error:
    models.check_stage(cifar, "stage7", "'cifar_resnet20'")
  assert str(error.value) == ("Unknown stage 'stage7' for 'cifar_resnet20'; choose one of "
                              "stem, stage1, stage2, stage3, pre_logits, logits with --stage.")
  with pytest.raises(ValueError, match=r"Unknown stage 'logits' for this model \('logits' "
                                       r"needs weights with a classifier head\); choose one "
                                       r"of stem, stage1, stage2, stage3, pre_logits with"):
    models.check_stage(cifar.clone(num_classes=None), "logits")
  with pytest.raises(ValueError, match="choose one of stem, stage1, pre_logits, logits"):
    models.check_stage(cifar.clone(last_stage="stage1"), "stage2")


def test_model_for_stage_computes_the_same_features_from_a_subset_of_variables():
  model = models.get_model("cifar_resnet20")
  variables = init(model)
  full = traverse_util.flatten_dict(variables, sep="/")
  expected = models.extract_features(model, variables, IMAGES)
  for stage in models.feature_names(model):
    truncated = models.model_for_stage(model, stage)
    assert isinstance(truncated, models.Backbone)
    wanted = traverse_util.flatten_dict(jax.eval_shape(lambda m=truncated: init(m)), sep="/")
    assert wanted.keys() <= full.keys()
    subset = traverse_util.unflatten_dict({k: full[k] for k in wanted}, sep="/")
    # Same operations on the same numbers, run eagerly op by op: bit-identical.
    got = models.extract_features(truncated, subset, IMAGES, [stage])[stage]
    np.testing.assert_array_equal(got, expected[stage])
    if stage == "logits":
      assert truncated is model and wanted.keys() == full.keys()
    else:
      assert truncated.num_classes is None and not any(k.startswith("params/head/")
                                                       for k in wanted)
    if stage in model.stage_names:
      assert truncated.last_stage == stage
      later = model.stage_names[model.stage_names.index(stage) + 1:]
      assert not any(k.split("/")[1] in later for k in wanted)
  assert models.model_for_stage(models.get_model("vgg11"), "fc").last_stage == "fc"
  with pytest.raises(ValueError, match="Unknown stage 'stage4'.*choose one of stem, stage1, "
                                       "stage2, stage3, pre_logits, logits"):
    models.model_for_stage(model, "stage4")


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


@pytest.mark.parametrize("size, kernel, stride, padding", [
    (8, 3, 1, (1, 1)), (9, 3, 2, (1, 1)), (8, 3, 2, (0, 1)), (8, 5, 2, (1, 2)),
    (7, 7, 1, (3, 3)), (1, 3, 1, (1, 1)), (6, 5, 1, (2, 2))])
def test_depthwise_path_is_xlas_grouped_convolution_in_float64(size, kernel, stride, padding):
  """The depthwise path computes the same sums as XLA's grouped convolution.

  Exact mathematics, checked in float64: only the order of the kernel_h *
  kernel_w additions differs, so values and gradients agree to ~1e-15 of
  their scale (bound 1e-12). Asymmetric padding is Keras' stride-2 "same".
  """
  channels = 6
  rng = np.random.RandomState(size + kernel + stride)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.randn(2, size, size + 1, channels), jnp.float64)
    w = jnp.asarray(rng.randn(kernel, kernel, 1, channels), jnp.float64)
    pads = (padding, padding)
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def ours(x, w):
      return layers.small_map_conv(x, w, (stride, stride), pads, dimension_numbers=numbers,
                                   feature_group_count=channels)

    def xla(x, w):
      return jax.lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=numbers,
                                          feature_group_count=channels)

    # The CPU takes the shifted-view path: no convolution is left in it.
    assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, w))
    expected = np.asarray(xla(x, w))
    np.testing.assert_allclose(ours(x, w), expected, rtol=0,
                               atol=1e-12 * np.max(np.abs(expected)))
    grads = [jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
             for f in (ours, xla)]
    for a, b in zip(*grads):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * float(np.max(np.abs(b))))


def test_grouped_convolutions_that_are_not_depthwise_keep_xlas_path():
  x = jnp.ones((1, 8, 8, 4))
  numbers = jax.lax.conv_dimension_numbers(x.shape, (3, 3, 2, 4), ("NHWC", "HWIO", "NHWC"))
  grouped = jax.make_jaxpr(lambda x, w: layers.small_map_conv(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers, feature_group_count=2))(
          x, jnp.ones((3, 3, 2, 4)))
  assert "conv_general_dilated" in str(grouped)


def test_head_init_zeros_starts_the_new_head_at_zero():
  key = jax.random.key(3)
  default = models.get_model("resnet18", num_classes=3).init(key, IMAGES)
  zeros_model = models.get_model("resnet18", num_classes=3, head_init="zeros")
  zeros = zeros_model.init(key, IMAGES)
  assert np.any(np.asarray(default["params"]["head"]["kernel"]) != 0)  # the default is unchanged
  np.testing.assert_array_equal(zeros["params"]["head"]["kernel"], 0)
  np.testing.assert_array_equal(zeros["params"]["head"]["bias"], 0)
  # Only the head differs; the first logits are all equal (zero).
  for path in ("stem", "stage1", "stage4"):
    for a, b in zip(jax.tree.leaves(default["params"][path]), jax.tree.leaves(zeros["params"][path])):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(zeros_model.apply(zeros, IMAGES), 0)
  with pytest.raises(ValueError, match="head_init='xavier': use one of lecun, zeros"):
    models.get_model("resnet18", num_classes=3, head_init="xavier").init(key, IMAGES)


def test_config_head_init_reaches_the_model():
  from tlflax import build, defaults  # pylint: disable=import-outside-toplevel
  config = defaults.base_config()
  config.model.name = "cifar_resnet20"
  assert build.make_model(config, num_classes=4).head_init == "lecun"
  config.model.head_init = "zeros"
  assert build.make_model(config, num_classes=4).head_init == "zeros"
