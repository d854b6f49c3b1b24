"""Parity of every torchvision backbone with PyTorch, as a table.

For each model: random weights with non-trivial BatchNorm statistics, saved
by PyTorch, converted by tlflax, both run on the same random images. Prints
the maximum absolute difference relative to the largest reference output, in
inference mode and in training mode (batch statistics, dropout off; measured
against PyTorch in float64, next to PyTorch's own float32 error, which bounds
what any float32 implementation can reach on deep random networks).

    .venv/bin/python experiments/parity_report.py [--models resnet18 vgg16]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax.numpy as jnp
import numpy as np
import torch
import torchvision

from tlflax import models, weights

SIZES = {"resnet18": 32, "resnet34": 32, "resnet50": 32, "resnet101": 32, "resnet152": 32,
         "wide_resnet50_2": 32, "resnext50_32x4d": 32, "vgg11": 64, "vgg13": 64, "vgg16": 64,
         "vgg19": 64, "vgg11_bn": 64, "vgg13_bn": 64, "vgg16_bn": 64, "vgg19_bn": 64}


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def randomize_batchnorm(module, seed=0):
  generator = torch.Generator().manual_seed(seed)
  for layer in module.modules():
    if isinstance(layer, torch.nn.BatchNorm2d):
      n = layer.num_features
      layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
      layer.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
      layer.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
      layer.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
    if isinstance(layer, torch.nn.Dropout):
      layer.p = 0.0


def measure(name: str, directory: str) -> tuple[float, float, float]:
  torch.manual_seed(0)
  reference = getattr(torchvision.models, name)()
  randomize_batchnorm(reference)
  path = os.path.join(directory, f"{name}.pth")
  torch.save(reference.state_dict(), path)
  variables = weights.load(name, path, source="torchvision")
  options = {"dropout_rate": 0.0} if name.startswith("vgg") else {}
  model = models.get_model(name, **options)
  size = SIZES[name]

  images = np.random.RandomState(1).randn(2, 3, size, size).astype(np.float32)
  reference.eval()
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  inference = relative_error(model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1))),
                             expected)

  images = np.random.RandomState(2).randn(4, 3, size, size).astype(np.float32)
  reference.train()
  with torch.no_grad():
    expected32 = reference(torch.from_numpy(images)).numpy()
    exact = reference.double()(torch.from_numpy(images).double()).numpy()
  actual, _ = model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), train=True,
                          mutable=["batch_stats"])
  return inference, relative_error(actual, exact), relative_error(expected32, exact)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="*", default=sorted(SIZES))
  args = parser.parse_args()
  print("| model | input | inference | train (vs PyTorch float64) | PyTorch's own float32 |")
  print("|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as directory:
    for name in args.models:
      inference, train, torch_own = measure(name, directory)
      print(f"| {name} | {SIZES[name]}x{SIZES[name]} | {inference:.1e} | {train:.1e} | "
            f"{torch_own:.1e} |", flush=True)


if __name__ == "__main__":
  main()
