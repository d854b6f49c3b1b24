"""Building blocks shared by every backbone.

Two things here matter for transfer learning:

* `BatchNorm` decides per layer whether to use batch statistics. A layer whose
  module path matches one of `frozen_patterns` always normalises with its
  running statistics and never updates them, even under `train=True` (the
  Keras rule for frozen layers). Freezing rules fill those patterns in.
* Every backbone sows its stage outputs into the `intermediates` collection, so
  any stage (and the pooled pre-logit features) can be read without rewriting
  the model; see `tlflax.models.extract_features`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

# Name under which every backbone sows the pooled features fed to the head.
PRE_LOGITS = "pre_logits"


def symmetric_padding(padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch-style padding: `padding` pixels on every side.

  Flax's "SAME" pads an even input asymmetrically for stride 2, which is not
  what PyTorch or Keras' explicit ZeroPadding does; converted weights only
  reproduce the original outputs with explicit padding.
  """
  return ((padding, padding), (padding, padding))


# Output maps of at most this many pixels are convolved as im2col + matmul on
# CPU. XLA's CPU convolution runs at ~240 GFLOP/s on 2 cores from 8x8 maps up,
# but a 3x3 convolution producing a 2x2 map runs at ~3 GFLOP/s (176 ms instead
# of 1.8 ms for 32x2x2x512, and 50x slower in the stride-2 backward), which
# made a ResNet step on 64x64 images 13-20x slower than PyTorch.
# See benchmarks/small_map_conv.py.
SMALL_MAP_PIXELS = 16

_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                      out_spec=(0, 3, 1, 2))


def _no_dilation(dilation) -> bool:
  return dilation is None or all(d == 1 for d in dilation)


def im2col_conv(x, kernel, strides, padding):
  """NHWC x HWIO convolution as one matmul over the stacked shifted windows."""
  kernel_h, kernel_w, in_channels, out_channels = kernel.shape
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  stride_h, stride_w = strides
  out_h = (x.shape[1] - kernel_h) // stride_h + 1
  out_w = (x.shape[2] - kernel_w) // stride_w + 1
  windows = [x[:, i:i + stride_h * (out_h - 1) + 1:stride_h,
               j:j + stride_w * (out_w - 1) + 1:stride_w, :]
             for i in range(kernel_h) for j in range(kernel_w)]
  patches = jnp.concatenate(windows, axis=-1) if len(windows) > 1 else windows[0]
  y = jnp.dot(patches.reshape(-1, kernel_h * kernel_w * in_channels),
              kernel.reshape(-1, out_channels))
  return y.reshape(x.shape[0], out_h, out_w, out_channels)


def depthwise_conv(x, kernel, strides, padding):
  """NHWC depthwise convolution as a sum of shifted, per-channel scaled views.

  Args:
    x: (N, H, W, C).
    kernel: (kernel_h, kernel_w, 1, C), HWIO with one input channel per group
      (`feature_group_count=C`).
    strides: (stride_h, stride_w).
    padding: ((top, bottom), (left, right)).

  Returns:
    (N, out_h, out_w, C): `lax.conv_general_dilated(..., feature_group_count=C)`
    up to the order of the kernel_h * kernel_w additions. XLA fuses the sum
    into one pass over the input (and its gradient into a few), where its
    CPU grouped convolution runs 10-50x slower forward and 5-15x slower
    backward on EfficientNet's shapes (see benchmarks/depthwise_conv.py).
  """
  kernel_h, kernel_w = kernel.shape[0], kernel.shape[1]
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  stride_h, stride_w = strides
  out_h = (x.shape[1] - kernel_h) // stride_h + 1
  out_w = (x.shape[2] - kernel_w) // stride_w + 1
  total = None
  for i in range(kernel_h):
    for j in range(kernel_w):
      term = x[:, i:i + stride_h * (out_h - 1) + 1:stride_h,
               j:j + stride_w * (out_w - 1) + 1:stride_w, :] * kernel[i, j, 0]
      total = term if total is None else total + term
  return total


def small_map_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                   precision=None, **kwargs):
  """`lax.conv_general_dilated`, with XLA's two slow CPU cases done otherwise.

  Same arguments and results (up to the order of additions). On the CPU, in
  the plain case (NHWC/HWIO, no dilation, explicit or "VALID" padding):

  * an output of at most `SMALL_MAP_PIXELS` pixels, without groups, is
    computed as im2col + matmul (`im2col_conv`);
  * a depthwise convolution (one input channel per group, as many outputs
    as inputs) as a sum of shifted views (`depthwise_conv`).

  Everything else, and every other backend, is `lax.conv_general_dilated`.
  """
  if isinstance(padding, str) and padding == "VALID":
    padding = ((0, 0), (0, 0))
  plain = (jax.default_backend() == "cpu" and lhs.ndim == 4
           and kwargs.get("batch_group_count", 1) == 1 and not isinstance(padding, str)
           and _no_dilation(lhs_dilation) and _no_dilation(rhs_dilation)
           and dimension_numbers == _NHWC_HWIO)
  if plain and feature_group_count == 1:
    out_h = (lhs.shape[1] + sum(padding[0]) - rhs.shape[0]) // window_strides[0] + 1
    out_w = (lhs.shape[2] + sum(padding[1]) - rhs.shape[1]) // window_strides[1] + 1
    if out_h * out_w <= SMALL_MAP_PIXELS:
      return im2col_conv(lhs, rhs, window_strides, padding)
  depthwise = (feature_group_count > 1 and rhs.shape[2] == 1
               and rhs.shape[3] == feature_group_count == lhs.shape[3])
  if plain and depthwise:
    return depthwise_conv(lhs, rhs, window_strides, padding)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  precision=precision, **kwargs)


class Conv(nn.Conv):
  """`nn.Conv` that avoids XLA's slow CPU paths (tiny maps, depthwise).

  Parameters and results are those of `nn.Conv`; see `small_map_conv`.
  """
  conv_general_dilated: Any = small_map_conv


def module_path(module: nn.Module) -> str:
  """The `/`-joined path of a bound module, e.g. `stage1/block2/bn1`."""
  return "/".join(str(p) for p in module.scope.path)


def matches_any(path: str, patterns: Sequence[str]) -> bool:
  return any(re.fullmatch(p, path) for p in patterns)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` that can be held in inference mode by path.

  Attributes:
    frozen_patterns: regular expressions over module paths; a matching layer
      runs on its running statistics and leaves them untouched, whatever
      `train` says.
    use_fast_variance: False (two-pass variance, as PyTorch and Keras).
  """

  frozen_patterns: tuple[str, ...] = ()
  # Two-pass variance, as PyTorch and Keras compute it: E[x^2] - E[x]^2 loses
  # most digits when a channel's mean is large next to its spread.
  use_fast_variance: bool = False

  def __call__(self, x, train: bool = False):  # pylint: disable=arguments-renamed
    frozen = bool(self.frozen_patterns) and matches_any(
        module_path(self), self.frozen_patterns)
    return super().__call__(x, use_running_average=(not train) or frozen)


def adaptive_avg_pool(x: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
  """PyTorch's `AdaptiveAvgPool2d` on NHWC input.

  Output cell i averages input rows floor(i*H/out) .. ceil((i+1)*H/out)-1,
  exactly as PyTorch does, so VGG heads see the same numbers for any input
  size (for a 1x1 map every cell is a copy of it).
  """
  _, height, width, _ = x.shape
  out_h, out_w = output_size
  if (height, width) == (out_h, out_w):
    return x

  def bounds(size, out):
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]

  rows = []
  for h0, h1 in bounds(height, out_h):
    cols = [jnp.mean(x[:, h0:h1, w0:w1, :], axis=(1, 2))
            for w0, w1 in bounds(width, out_w)]
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


def sow_feature(module: nn.Module, name: str, x) -> None:
  """Records `x` as feature `name` in the `intermediates` collection.

  All features of a model go into one dict (`intermediates/features`), so
  their names may equal submodule names such as `stage2`. Costs nothing unless
  the caller makes `intermediates` mutable.
  """
  module.sow("intermediates", "features", {name: x}, init_fn=dict,
             reduce_fn=lambda features, new: {**features, **new})


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(x, axis=(1, 2))
