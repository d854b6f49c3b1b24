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
import jax.numpy as jnp

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
