"""tlflax.nnx: backbones inside NNX modules, with converted weights and linen's freeze rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import torchvision
from flax import nnx

from conftest import INFERENCE_TOLERANCE, relative_error
from test_torchvision_parity import randomize_batchnorm, to_nhwc
import tlflax
import tlflax.nnx
from tlflax import optim, stages, steps, tree, weights
from tlflax.training import loop
from tlflax.weights.merge import WeightsError


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  """A torchvision resnet18 with random weights and BatchNorm statistics, saved as .pth."""
  torch.manual_seed(0)
  reference = torchvision.models.resnet18()
  randomize_batchnorm(reference)
  reference.eval()
  path = tmp_path_factory.mktemp("nnx") / "resnet18.pth"
  torch.save(reference.state_dict(), path)
  return reference, path


def test_logits_equal_linen_and_torchvision(resnet18_file):
  reference, path = resnet18_file
  variables = weights.load("resnet18", path, source="torchvision")
  model = tlflax.get_model("resnet18")
  backbone = tlflax.nnx.to_nnx(model, variables)
  images = np.random.RandomState(1).randn(2, 3, 32, 32).astype(np.float32)

  logits = backbone(to_nhwc(images))
  # The NNX module runs the very linen computation on the very arrays: equal bits.
  np.testing.assert_array_equal(logits, model.apply(variables, to_nhwc(images)))
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  assert relative_error(logits, expected) < INFERENCE_TOLERANCE

  # The variables are in NNX's state under their linen names and types.
  assert backbone.linen.stem["conv"]["kernel"].shape == (7, 7, 3, 64)
  assert isinstance(backbone.linen.stem["bn"]["mean"], nnx.BatchStat)
  assert isinstance(backbone.linen.head["kernel"], nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, backbone.variables(), variables)


def random_variables(model, size=8, seed=0):
  """Random variables for `model`, drawn in numpy (an eager `model.init` compiles op by op).

  Kernels are scaled by their fan-in so activations keep their size; running
  statistics are non-trivial, so that "kept" and "updated" differ.
  """
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))

  def draw(path, shape):
    kind, shape = path.rsplit("/", 1)[-1], shape.shape
    if kind == "kernel":
      return rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
    if kind == "scale":
      return 1 + 0.1 * rng.randn(*shape)
    if kind == "var":
      return 0.5 + rng.rand(*shape)
    return 0.25 * rng.randn(*shape)  # bias, mean

  flat = {path: jnp.asarray(draw(path, shape), jnp.float32)
          for path, shape in tree.flatten(shapes).items()}
  return tree.unflatten(flat)


def cifar_backbone(freeze="depth:2", **options):
  model = tlflax.get_model("cifar_resnet20", **options)
  variables = random_variables(model)
  return model, variables, tlflax.nnx.to_nnx(model, variables, freeze=freeze)


class Classifier(nnx.Module):
  """A backbone without a head, and an NNX head of our own."""

  def __init__(self, backbone, num_classes, rngs):
    self.backbone = backbone
    self.head = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, images, train=False):
    return self.head(self.backbone(images, train=train))


def snapshot(module):
  """`{path: array}` of every parameter and BatchNorm statistic."""
  state = nnx.to_pure_dict(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
  return {path: np.asarray(value) for path, value in tree.flatten(state).items()}


def test_training_keeps_frozen_part_bit_identical():
  model, variables, backbone = cifar_backbone(num_classes=None)
  net = Classifier(backbone, 3, nnx.Rngs(0))
  trainable = tlflax.nnx.trainable_filter(net)
  optimizer = nnx.Optimizer(net, optax.sgd(0.1, momentum=0.9), wrt=trainable)
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randn(4, 8, 8, 3).astype(np.float32))
  labels = jnp.asarray([0, 1, 2, 0])

  frozen_stages = ("stem", "stage1", "stage2")  # depth:2
  def is_frozen(path):  # e.g. "backbone/linen/stage2/block1/conv1/kernel"
    return path.startswith("backbone/") and path.split("/")[2] in frozen_stages

  before = snapshot(net)
  trainable_paths = set(tree.flatten(nnx.to_pure_dict(nnx.state(net, trainable))))
  # No optimizer state for frozen parameters: momentum exactly over the trainable ones.
  # (optax.sgd's state is (TraceState(trace=<the parameter tree>), EmptyState()).)
  momentum = nnx.to_flat_state(nnx.state(optimizer.opt_state, nnx.OptVariable))
  assert {"/".join(map(str, path[2:])) for path, _ in momentum} == trainable_paths
  assert trainable_paths == {p for p in before if p.startswith("head/")
                             or (not is_frozen(p) and not p.endswith(("/mean", "/var")))}

  for _ in range(3):
    metrics = tlflax.nnx.train_step(net, optimizer, images, labels)
  assert np.isfinite(metrics["loss"])
  after = snapshot(net)
  assert set(after) == set(before)
  for path in before:
    if path.startswith("head/"):
      assert not np.array_equal(after[path], before[path]), path
    elif is_frozen(path):  # parameters and BatchNorm statistics alike
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    else:  # trained parameters, and statistics of BatchNorm layers in training mode
      assert not np.array_equal(after[path], before[path]), path
  # The frozen BatchNorm layers come from the rules, through the backbone's field.
  frozen_batchnorm = backbone.model.frozen_batchnorm
  assert "stem/bn" in frozen_batchnorm and r"stage2/block3/bn2" in frozen_batchnorm
  assert not [p for p in frozen_batchnorm if p.startswith("stage3")]

  # Gradients exist for the trainable parameters only.
  def loss_fn(net):
    return steps.cross_entropy(net(images, train=True), labels)
  # Traced, not run: the structure of the gradient is what is checked.
  grads = nnx.eval_shape(nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable)), net)
  assert set(tree.flatten(nnx.to_pure_dict(grads))) == trainable_paths


@pytest.mark.slow
def test_nnx_step_matches_linen_step():
  """One SGD step through NNX lands where tlflax's linen train step does."""
  model, variables, backbone = cifar_backbone()
  rng = np.random.RandomState(1)
  batch = {"image": jnp.asarray(rng.randn(4, 8, 8, 3).astype(np.float32)),
           "label": jnp.asarray([0, 5, 9, 3])}
  optimizer = nnx.Optimizer(backbone, optax.sgd(0.1),
                            wrt=tlflax.nnx.trainable_filter(backbone))
  nnx_loss = tlflax.nnx.train_step(backbone, optimizer, batch["image"], batch["label"])["loss"]

  freezing = tlflax.compile_rules(tlflax.rules_from_spec("depth:2", model.stage_names),
                                  variables["params"])
  tx = optim.make_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.0,
                             "schedule": "constant"}, freezing, total_steps=1)
  state = steps.create_train_state(variables, tx, freezing)
  state, metrics = jax.jit(steps.make_train_step(model, tx, freezing))(state, batch)

  # Two XLA programs of the same float32 maths (the linen step splits and
  # re-merges the tree), which XLA may fuse and order differently: at most
  # rounding differences, far below the 1e-4 float32 inference bound (on the
  # x86 CPUs tried, AVX and SSE4.2, the results were bit-identical).
  assert abs(float(nnx_loss) - float(metrics["loss"])) <= INFERENCE_TOLERANCE * abs(
      float(metrics["loss"]))
  expected = tree.flatten({"params": state.params, "batch_stats": state.batch_stats})
  actual = tree.flatten(backbone.variables())
  assert set(actual) == set(expected)
  for path in expected:
    assert relative_error(actual[path], expected[path]) < INFERENCE_TOLERANCE, path


def test_mismatched_weights_are_refused(resnet18_file):
  _, path = resnet18_file
  pretrained = weights.load("resnet18", path, source="torchvision")  # 1000 classes
  with pytest.raises(WeightsError, match=r"(?s)params/head/kernel.*merge_pretrained"):
    tlflax.nnx.to_nnx(tlflax.get_model("resnet18", num_classes=10), pretrained)
  with pytest.raises(WeightsError, match=r"(?s)missing from the file.*stage1/block3"):
    tlflax.nnx.to_nnx(tlflax.get_model("resnet34"), pretrained)
  with pytest.raises(WeightsError, match="tlflax.weights.load returns"):
    tlflax.nnx.to_nnx(tlflax.get_model("resnet18"), pretrained["params"]["stem"])


def test_new_head_through_merge_pretrained(resnet18_file):
  _, path = resnet18_file
  pretrained = weights.load("resnet18", path, source="torchvision")
  model = tlflax.get_model("resnet18", num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  variables, report = weights.merge_pretrained(fresh, pretrained)
  assert report.reinitialised == ["params/head/bias", "params/head/kernel"]
  backbone = tlflax.nnx.to_nnx(model, variables, freeze="linear_probe")
  trainable = nnx.state(backbone, tlflax.nnx.trainable_filter(backbone))
  assert sorted(tree.flatten(nnx.to_pure_dict(trainable))) == ["linen/head/bias",
                                                              "linen/head/kernel"]
  assert backbone.model.frozen_batchnorm  # every BatchNorm layer is frozen


def test_bad_freeze_rules_are_refused():
  model = tlflax.get_model("cifar_resnet20")
  variables = random_variables(model)
  with pytest.raises(ValueError, match="learning-rate multipliers"):
    tlflax.nnx.to_nnx(model, variables, freeze="lld:0.7")
  with pytest.raises(ValueError, match="decide nothing"):
    tlflax.nnx.to_nnx(model, variables, freeze=[("stage_1/.*", "frozen"), (".*", "trainable")])
  with pytest.raises(ValueError, match="no tlflax backbone"):
    tlflax.nnx.trainable_filter(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_a_spec_means_what_it_means_in_the_training_loop():
  """One policy (freeze.compile_spec): a spec string's own rules need not all match."""
  model = TinyDropoutNet()
  variables = model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 3)))
  # "batchnorm" on a network without BatchNorm: the head trains, the rest is frozen.
  backbone = tlflax.nnx.to_nnx(model, variables, freeze="batchnorm")
  loop_freezing = loop.compile_freezing(
      ml_collections.ConfigDict({"freeze": {"batchnorm_mode": "frozen_layers"}}),
      stages.Stage("train", 0, 0, 1, "batchnorm", ml_collections.ConfigDict()), model,
      variables["params"])
  assert sorted(backbone.frozen_paths) == sorted(loop_freezing.frozen_paths) == [
      "stage1/bias", "stage1/kernel"]


class TinyDropoutNet(nn.Module):
  """A one-stage backbone with dropout: how `train=` and the dropout rng pass through."""
  last_stage: str | None = None
  input_stage: str | None = None
  num_classes: int | None = 3
  frozen_batchnorm: tuple[str, ...] = ()
  dtype: object = jnp.float32
  head_init: str = "lecun"

  @property
  def stage_names(self):
    return ("stage1",)

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(16, name="stage1")(jnp.mean(x, axis=(1, 2)))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="head")(x)


def test_train_flag_and_dropout_rng_pass_through():
  model = TinyDropoutNet()
  images = jnp.asarray(np.random.RandomState(0).randn(2, 4, 4, 3).astype(np.float32))
  variables = model.init(jax.random.key(0), images)
  backbone = tlflax.nnx.to_nnx(model, variables, rngs=7)

  np.testing.assert_array_equal(backbone(images), backbone(images))  # no dropout
  first, second = backbone(images, train=True), backbone(images, train=True)
  assert not np.array_equal(first, second)  # a fresh key per call

  # A stream's first key is its seed folded with 0; linen gets it as "dropout".
  key = jax.random.key(3)
  expected = model.apply(variables, images, train=True,
                         rngs={"dropout": jax.random.fold_in(key, 0)})
  actual = backbone(images, train=True, rngs=nnx.Rngs(dropout=key))
  np.testing.assert_array_equal(actual, expected)


@pytest.mark.slow
@pytest.mark.parametrize("name, options", [("vit_tiny_patch16_224", {"image_size": 32}),
                                           ("convnext_tiny", {})])
def test_other_families_take_the_same_path(name, options):
  """Nothing in tlflax.nnx is ResNet-specific: a ViT (no BatchNorm) and a ConvNeXt."""
  model = tlflax.get_model(name, num_classes=3, **options)
  variables = random_variables(model, size=32)
  backbone = tlflax.nnx.to_nnx(model, variables, freeze="depth:1")
  images = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32))
  np.testing.assert_array_equal(backbone(images), model.apply(variables, images))

  optimizer = nnx.Optimizer(backbone, optax.sgd(0.1),
                            wrt=tlflax.nnx.trainable_filter(backbone))
  before = snapshot(backbone)
  tlflax.nnx.train_step(backbone, optimizer, images, jnp.asarray([0, 2]))
  after = snapshot(backbone)
  frozen = {"linen/" + path for path in backbone.frozen_paths}
  assert frozen and set(after) == set(before)
  for path in before:
    if path in frozen:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  assert not np.array_equal(after["linen/head/kernel"], before["linen/head/kernel"])
