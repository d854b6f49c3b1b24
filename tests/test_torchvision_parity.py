"""Converted torchvision and timm weights compute what PyTorch computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from conftest import (FLOAT64_TOLERANCE, INFERENCE_TOLERANCE, by_run_set, float32_train_bound,
                      relative_error)
from tlflax import models, weights

TOLERANCE = INFERENCE_TOLERANCE

# Input sizes: ResNets at 32x32 reach a 1x1 map in stage4; VGG at 64x64 ends on
# a 2x2 map, so the adaptive 7x7 pool and the NCHW->NHWC row permutation of the
# first dense layer are both exercised with distinct values.
TORCHVISION_MODELS = {
    "resnet18": 32, "resnet34": 32, "resnet50": 32, "resnet101": 32,
    "resnet152": 32, "wide_resnet50_2": 32, "resnext50_32x4d": 32,
    "vgg11": 64, "vgg13": 64, "vgg16": 64, "vgg19": 64,
    "vgg11_bn": 64, "vgg13_bn": 64, "vgg16_bn": 64, "vgg19_bn": 64,
}


def randomize_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
  """Non-trivial BatchNorm statistics and affine parameters, so they are tested."""
  generator = torch.Generator().manual_seed(seed)
  for layer in module.modules():
    if isinstance(layer, torch.nn.BatchNorm2d):
      n = layer.num_features
      layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
      layer.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
      layer.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
      layer.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)


def no_dropout(module: torch.nn.Module) -> None:
  for layer in module.modules():
    if isinstance(layer, torch.nn.Dropout):
      layer.p = 0.0


def to_nhwc(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(x.transpose(0, 2, 3, 1))


# The README test command keeps one network of each kind, the slow set the
# widened ResNet; the deeper ResNets and the middle VGGs repeat the same blocks
# (`pytest -m every_size`).
DEFAULT_RUN = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d", "vgg11", "vgg11_bn",
               "vgg16_bn")


@pytest.mark.parametrize("name", by_run_set(sorted(TORCHVISION_MODELS), default=DEFAULT_RUN,
                                            slow=("wide_resnet50_2",)))
def test_torchvision_parity(name, tmp_path):
  torch.manual_seed(0)
  reference = getattr(torchvision.models, name)()
  randomize_batchnorm(reference)
  path = tmp_path / f"{name}.pth"
  torch.save(reference.state_dict(), path)

  variables = weights.load(name, path, source="torchvision")
  size = TORCHVISION_MODELS[name]
  images = np.random.RandomState(1).randn(2, 3, size, size).astype(np.float32)

  # Inference mode: running statistics.
  reference.eval()
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  model = models.get_model(name)
  actual = model.apply(variables, to_nhwc(images), train=False)
  assert relative_error(actual, expected) < TOLERANCE
  assert_inference_parity_in_float64(reference, model, variables, images)

  # Training mode: batch statistics (dropout off on both sides, it is random).
  no_dropout(reference)
  model = models.get_model(name, dropout_rate=0.0) if name.startswith("vgg") else model
  assert_train_mode_parity(reference, model, variables, size)


# The float32 training-mode comparison runs on three batches (their seeds).
TRAIN_BATCHES = (2, 3, 4)


def assert_train_mode_parity(reference, model, variables, size):
  """Batch-statistics outputs: exact in float64, as close as rounding allows in float32.

  Both frameworks run the same weights on the same images in float64 (the
  mathematics, to FLOAT64_TOLERANCE, on the first batch) and in float32 (ours
  within `float32_train_bound` of PyTorch's own float32 error; see
  tests/conftest.py for both arguments). The float32 errors are medians over
  TRAIN_BATCHES batches: one batch's rounding error is a heavy-tailed sample
  (see conftest.FLOAT32_TRAIN_FACTOR).

  Returns:
    {"train32": ..., "train32_bound": ..., "train64": ...}, the relative errors.
  """
  ours, theirs, train64 = [], [], None
  for seed in TRAIN_BATCHES:
    images = np.random.RandomState(seed).randn(4, 3, size, size).astype(np.float32)
    reference.train()
    with torch.no_grad():
      expected32 = reference(torch.from_numpy(images)).numpy()
      exact = reference.double()(torch.from_numpy(images).double()).numpy()
    reference.float()
    actual, _ = model.apply(variables, to_nhwc(images), train=True, mutable=["batch_stats"])
    ours.append(relative_error(actual, exact))
    theirs.append(relative_error(expected32, exact))
    if train64 is None:
      train64 = relative_error(run_in_float64(model, variables, images, train=True), exact)
  errors = {"train32": float(np.median(ours)),
            "train32_bound": float32_train_bound(float(np.median(theirs))),
            "train64": train64}
  assert errors["train32"] < errors["train32_bound"]
  assert errors["train64"] < FLOAT64_TOLERANCE
  return errors


def run_in_float64(model, variables, images, train):
  """Our model in float64 (parameters, statistics, compute and output)."""
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    images = jnp.asarray(images.transpose(0, 2, 3, 1), jnp.float64)
    model = model.clone(dtype=jnp.float64)
    if train:
      out, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    else:
      out = model.apply(variables, images, train=False)
    assert out.dtype == jnp.float64
    return np.asarray(out)


def assert_inference_parity_in_float64(reference, model, variables, images):
  reference.eval()
  with torch.no_grad():
    exact = reference.double()(torch.from_numpy(images).double()).numpy()
  reference.float()
  error = relative_error(run_in_float64(model, variables, images, train=False), exact)
  assert error < FLOAT64_TOLERANCE
  return error


def test_running_statistics_update_like_pytorch(tmp_path):
  """Same momentum; PyTorch keeps the unbiased variance, flax the biased one."""
  torch.manual_seed(0)
  reference = torchvision.models.resnet18()
  randomize_batchnorm(reference)
  torch.save(reference.state_dict(), tmp_path / "r18.pth")
  variables = weights.load("resnet18", tmp_path / "r18.pth", source="torchvision")
  images = np.random.RandomState(2).randn(4, 3, 32, 32).astype(np.float32)

  reference.train()
  with torch.no_grad():
    reference(torch.from_numpy(images))
  _, state = models.get_model("resnet18").apply(
      variables, to_nhwc(images), train=True, mutable=["batch_stats"])

  stem_bn = state["batch_stats"]["stem"]["bn"]
  np.testing.assert_allclose(stem_bn["mean"], reference.bn1.running_mean.numpy(),
                             rtol=1e-4, atol=1e-5)
  count = 4 * 16 * 16  # values per channel after the stride-2 stem conv
  old_var = variables["batch_stats"]["stem"]["bn"]["var"]
  batch_var_unbiased = (reference.bn1.running_var.numpy() - 0.9 * old_var) / 0.1
  expected_var = 0.9 * old_var + 0.1 * batch_var_unbiased * (count - 1) / count
  np.testing.assert_allclose(stem_bn["var"], expected_var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["legacy_pickle", "nested_dataparallel"])
def test_other_torch_file_layouts(layout, tmp_path):
  torch.manual_seed(0)
  reference = torchvision.models.resnet18(num_classes=7)
  randomize_batchnorm(reference)
  path = tmp_path / "weights.pth"
  if layout == "legacy_pickle":
    torch.save(reference.state_dict(), path, _use_new_zipfile_serialization=False)
  else:  # {"state_dict": {"module.conv1.weight": ...}, "epoch": 3}
    nested = {"module." + k: v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": nested, "epoch": 3}, path)

  variables = weights.load("resnet18", path, source="torchvision")
  assert variables["params"]["head"]["kernel"].shape == (512, 7)
  images = np.random.RandomState(3).randn(2, 3, 32, 32).astype(np.float32)
  reference.eval()
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  actual = models.get_model("resnet18", num_classes=7).apply(variables, to_nhwc(images))
  assert relative_error(actual, expected) < TOLERANCE


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_safetensors_parity(name, tmp_path):
  timm = pytest.importorskip("timm")
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  reference = timm.create_model(name, pretrained=False, num_classes=12)
  randomize_batchnorm(reference)
  path = tmp_path / "model.safetensors"
  save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))

  variables = weights.load(name, path, source="timm")
  images = np.random.RandomState(4).randn(2, 3, 32, 32).astype(np.float32)
  model = models.get_model(name, num_classes=12)
  reference.eval()
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  assert relative_error(model.apply(variables, to_nhwc(images)), expected) < TOLERANCE
  assert_inference_parity_in_float64(reference, model, variables, images)
  assert_train_mode_parity(reference, model, variables, 32)
