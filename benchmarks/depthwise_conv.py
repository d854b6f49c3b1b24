"""Why `tlflax.models.layers.Conv` computes depthwise convolutions as shifted views on CPU.

Two tables, each measured in the same run:

1. One depthwise convolution (EfficientNet-Lite0's shapes at 224 px, batch
   32), forward and forward + backward, three ways: XLA's grouped
   convolution (`lax.conv_general_dilated(feature_group_count=C)`), tlflax's
   path (`layers.small_map_conv`, a sum of shifted views), and PyTorch's
   `conv2d(groups=C)`.
2. A whole EfficientNet-Lite0 training step (forward, backward, SGD update;
   batch 32, two classes) at `--sizes` px: tlflax with XLA's convolution
   forced, tlflax as it runs, and the efficientnet-lite-pytorch model.

    .venv/bin/python benchmarks/depthwise_conv.py [--sizes 64,112]
"""

from __future__ import annotations

import argparse
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

from small_map_conv import median_ms  # this folder: run as a script

from tlflax import models
from tlflax.models import layers

# (input side, channels, kernel, stride): Lite0's depthwise convolutions at 224 px.
CASES = ((112, 32, 3, 1), (112, 96, 3, 2), (56, 144, 5, 2), (28, 240, 3, 2), (14, 480, 5, 1),
         (14, 672, 5, 2), (7, 1152, 3, 1))
BATCH = 32


def same_padding(size, kernel, stride):
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return (total // 2, total - total // 2)


def jax_times(conv, x, w):
  forward = jax.jit(conv)
  backward = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
  return (median_ms(lambda: forward(x, w).block_until_ready()),
          median_ms(lambda: jax.block_until_ready(backward(x, w))))


def torch_times(x, w, stride, pad):
  import torch  # pylint: disable=import-outside-toplevel
  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()
  wt = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).requires_grad_()

  def conv():
    padded = torch.nn.functional.pad(xt, (pad[0], pad[1], pad[0], pad[1]))
    return torch.nn.functional.conv2d(padded, wt, stride=stride, groups=xt.shape[1])

  def forward():
    with torch.no_grad():
      conv()

  def backward():
    (conv() ** 2).sum().backward()

  return median_ms(forward), median_ms(backward)


def convolution_table(rng):
  print(f"Depthwise convolution, batch {BATCH}, {jax.devices()[0].platform}; ms, "
        "fwd / fwd+bwd\n")
  print("| input | channels | kernel | stride | XLA grouped | tlflax | PyTorch "
        "| XLA / tlflax (fwd+bwd) |")
  print("|---|---|---|---|---|---|---|---|")
  for size, channels, kernel, stride in CASES:
    x = jnp.asarray(rng.randn(BATCH, size, size, channels), jnp.float32)
    w = jnp.asarray(rng.randn(kernel, kernel, 1, channels) * 0.1, jnp.float32)
    pad = same_padding(size, kernel, stride)
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    options = dict(dimension_numbers=numbers, feature_group_count=channels)
    xla = jax_times(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), (pad, pad), **options), x, w)
    ours = jax_times(lambda x, w: layers.small_map_conv(
        x, w, (stride, stride), (pad, pad), **options), x, w)
    reference = torch_times(x, w, stride, pad)
    print(f"| {size}x{size} | {channels} | {kernel} | {stride} | {xla[0]:.1f} / {xla[1]:.1f} "
          f"| {ours[0]:.1f} / {ours[1]:.1f} | {reference[0]:.1f} / {reference[1]:.1f} "
          f"| {xla[1] / ours[1]:.1f} |")


def tlflax_step_ms(size, rng) -> float:
  model = models.get_model("efficientnet_lite0", num_classes=2)
  images = jnp.asarray(rng.randn(BATCH, size, size, 3), jnp.float32)
  labels = jnp.asarray(rng.randint(0, 2, BATCH))
  variables = model.init(jax.random.key(0), images[:1], train=False)
  tx = optax.sgd(0.01, momentum=0.9)

  def loss(params, batch_stats):
    logits, state = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

  @jax.jit
  def step(params, batch_stats, opt_state):
    (_, state), grads = jax.value_and_grad(loss, has_aux=True)(params, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state["batch_stats"], opt_state

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  return median_ms(lambda: jax.block_until_ready(step(params, batch_stats, opt_state)))


def torch_step_ms(size, rng) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=import-outside-toplevel
  model = EfficientNet.from_name("efficientnet-lite0", num_classes=2, drop_connect_rate=0.0)
  model.train()
  images = torch.from_numpy(rng.randn(BATCH, 3, size, size).astype(np.float32))
  labels = torch.from_numpy(rng.randint(0, 2, BATCH))
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

  def step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()

  return median_ms(step)


def step_table(sizes, rng):
  print(f"\nEfficientNet-Lite0 training step (batch {BATCH}); ms\n")
  print("| input | tlflax, XLA's grouped convolution | tlflax | PyTorch | tlflax / PyTorch |")
  print("|---|---|---|---|---|")
  for size in sizes:
    with mock.patch.object(layers, "depthwise_conv", xla_grouped):
      xla = tlflax_step_ms(size, rng)
    ours = tlflax_step_ms(size, rng)
    reference = torch_step_ms(size, rng)
    print(f"| {size}x{size} | {xla:.0f} | {ours:.0f} | {reference:.0f} | "
          f"{ours / reference:.2f} |")


def xla_grouped(x, kernel, strides, padding):
  """`layers.depthwise_conv`'s arguments, computed by XLA's grouped convolution."""
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="64,112", help="input sides for the step table")
  parser.add_argument("--skip_convolutions", action="store_true",
                      help="only the training-step table")
  args = parser.parse_args()
  rng = np.random.RandomState(0)
  if not args.skip_convolutions:
    convolution_table(rng)
  step_table([int(s) for s in args.sizes.split(",")], rng)


if __name__ == "__main__":
  main()
