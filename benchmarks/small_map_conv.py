"""Why `tlflax.models.layers.Conv` switches to im2col on small CPU feature maps.

Times one 3x3 convolution (forward, and forward + backward) per feature-map
size, three ways in the same run: XLA's convolution (`lax.conv_general_dilated`),
tlflax's `small_map_conv` (im2col + matmul for outputs of at most
`SMALL_MAP_PIXELS` pixels, XLA otherwise), and PyTorch's `conv2d`.

    .venv/bin/python benchmarks/small_map_conv.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tlflax.models import layers

# (input size, channels, stride): the 3x3 convolutions of a ResNet at 64x64 input.
CASES = ((16, 64, 1), (8, 128, 1), (4, 256, 1), (2, 512, 1), (4, 512, 2), (1, 512, 1))
BATCH = 32


def median_ms(run, n=7) -> float:
  run()
  times = []
  for _ in range(n):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def jax_times(conv, x, w, stride):
  forward = jax.jit(lambda x, w: conv(x, w, stride))
  backward = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, stride) ** 2), argnums=(0, 1)))
  return (median_ms(lambda: forward(x, w).block_until_ready()),
          median_ms(lambda: jax.block_until_ready(backward(x, w))))


def xla_conv(x, w, stride):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def tlflax_conv(x, w, stride):
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  return layers.small_map_conv(x, w, (stride, stride), ((1, 1), (1, 1)),
                               dimension_numbers=numbers)


def torch_times(x, w, stride):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()
  wt = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).requires_grad_()

  def forward():
    with torch.no_grad():
      torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1)

  def backward():
    (torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1) ** 2).sum().backward()

  return median_ms(forward), median_ms(backward)


def main():
  rng = np.random.RandomState(0)
  print(f"3x3 convolution, batch {BATCH}, {jax.devices()[0].platform}; times in ms "
        f"(fwd / fwd+bwd); tlflax uses im2col for outputs <= {layers.SMALL_MAP_PIXELS} px\n")
  print("| input | channels | stride | XLA | tlflax | PyTorch | XLA / tlflax (fwd+bwd) |")
  print("|---|---|---|---|---|---|---|")
  for size, channels, stride in CASES:
    x = jnp.asarray(rng.randn(BATCH, size, size, channels), jnp.float32)
    w = jnp.asarray(rng.randn(3, 3, channels, channels) * 0.05, jnp.float32)
    xla = jax_times(xla_conv, x, w, stride)
    ours = jax_times(tlflax_conv, x, w, stride)
    reference = torch_times(x, w, stride)
    torch_cell = f"{reference[0]:.1f} / {reference[1]:.1f}" if reference else "-"
    print(f"| {size}x{size} | {channels} | {stride} | {xla[0]:.1f} / {xla[1]:.1f} | "
          f"{ours[0]:.1f} / {ours[1]:.1f} | {torch_cell} | {xla[1] / ours[1]:.1f} |")


if __name__ == "__main__":
  main()
