"""ConvNeXt (Liu et al. 2022) as torchvision and timm build it.

Both publishers build the same network and differ only in their module names
(see `tlflax.weights.convnext`). Stages follow the paper's four resolutions;
each stage after the first opens with its downsampling layer, as in the paper
and in timm (torchvision lists the downsampling layers between its stages):

    stem        conv 4x4/4, LayerNorm                          (1/4 resolution)
    stage1      blocks                                          (1/4)
    stage2..4   downsample_norm, downsample_conv 2x2/2, blocks  (1/8, 1/16, 1/32)
    final_norm  global average pool, then LayerNorm (a vector, like VGG's `fc`)
    head

A block: depthwise 7x7 convolution, LayerNorm over channels (channels last,
so a plain LayerNorm on NHWC), dense 4x wider, GELU (exact), dense back,
times a learned per-channel `layer_scale`, through stochastic depth, plus
the input.

Parameter paths: `stem/{conv,norm}`, `stage{i}/downsample_{norm,conv}`,
`stage{i}/block{j}/{dwconv,norm,fc1,fc2}`, `stage{i}/block{j}/layer_scale`,
`final_norm/{scale,bias}`, `head`.

The final LayerNorm is the stage `final_norm` so that every freezing rule
decides it (`depth:4` leaves it trainable, `depth:5` freezes it too, `lld:`
gives it its own rate) and the prefix cache can stop after `stage4` and still
apply it; `last_stage="stage4"` pools stage 4 without it, as truncating any
model skips what comes after. Every LayerNorm has epsilon 1e-6 and computes
its variance in two passes, as PyTorch does.

Stochastic depth (`drop_path_rate`, the rate of the last block; earlier
blocks get linearly less, from 0 at the first, as both publishers schedule
it) is off by default and acts only in training, drawing from the "dropout"
rng that the train step passes.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.models import layers
from tlflax.models.base import check_stages, classifier_head, numbered_stages, runs_stage

LAYER_NORM_EPSILON = 1e-6
# Both publishers start the layer scale at 1e-6 (trained weights replace it).
LAYER_SCALE_INIT = 1e-6


def layer_norm(dtype, name):
  """LayerNorm over the last (channel) axis, as ConvNeXt uses it everywhere."""
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, use_fast_variance=False,
                      name=name)


def drop_path(x, rate: float, rng) -> jnp.ndarray:
  """Zeroes whole examples with probability `rate`, scaling the kept ones by 1/(1-rate).

  Args:
    x: (batch, ...) residual branch output.
    rate: drop probability in [0, 1).
    rng: a JAX key.

  Returns:
    `x` with the dropped examples zero, so the block passes its input on.
  """
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class ConvNeXtBlock(nn.Module):
  """Depthwise 7x7, LayerNorm, dense 4x, GELU, dense, layer scale, residual."""
  features: int
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = layers.Conv(self.features, (7, 7), padding=layers.symmetric_padding(3),
                    feature_group_count=self.features, dtype=self.dtype, name="dwconv")(x)
    y = layer_norm(self.dtype, "norm")(y)
    y = nn.Dense(4 * self.features, dtype=self.dtype, name="fc1")(y)
    # PyTorch's nn.GELU: the exact (erf) form, not the tanh approximation.
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(self.features, dtype=self.dtype, name="fc2")(y)
    scale = self.param("layer_scale", nn.initializers.constant(LAYER_SCALE_INIT),
                       (self.features,))
    y = y * scale.astype(self.dtype)
    if train and self.drop_path_rate > 0:
      y = drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
    return x + y


class ConvNeXtStage(nn.Module):
  """An optional downsampling (LayerNorm, 2x2/2 conv), then the blocks."""
  features: int
  drop_path_rates: tuple[float, ...]
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.downsample:
      if min(x.shape[1:3]) < 2:
        raise ValueError(f"ConvNeXt needs inputs of at least 32 px: a {x.shape[1]}x"
                         f"{x.shape[2]} map is left before a 2x2/2 downsampling; resize "
                         "the images up.")
      x = layer_norm(self.dtype, "downsample_norm")(x)
      x = layers.Conv(self.features, (2, 2), (2, 2), padding="VALID", dtype=self.dtype,
                      name="downsample_conv")(x)
    for j, rate in enumerate(self.drop_path_rates):
      x = ConvNeXtBlock(self.features, rate, self.dtype, name=f"block{j + 1}")(x, train)
    return x


class ConvNeXt(nn.Module):
  """ConvNeXt backbone with named stages (a `base.Backbone`).

  Attributes:
    depths: blocks per stage.
    widths: channels per stage.
    num_classes: size of the `head` layer; `None` builds no head and returns
      the normalised pooled features.
    drop_path_rate: stochastic depth rate of the last block (0 = off); only
      in training, needs the "dropout" rng.
    last_stage: truncate after this stage; a body stage is then globally
      average-pooled (without the final norm) before the head.
    input_stage: the input is this stage's output; see `base.runs_stage`.
    dtype, frozen_batchnorm, head_init: as declared by `base.Backbone`
      (ConvNeXt has no BatchNorm, so `frozen_batchnorm` changes nothing).

  Examples:
    >>> model = convnext_tiny(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    >>> logits = model.apply(variables, images, train=False)
  """
  depths: Sequence[int]
  widths: Sequence[int]
  num_classes: Optional[int] = 1000
  drop_path_rate: float = 0.0
  last_stage: Optional[str] = None
  input_stage: Optional[str] = None
  dtype: Any = jnp.float32
  frozen_batchnorm: tuple[str, ...] = ()
  head_init: str = "lecun"

  @property
  def stage_names(self) -> tuple[str, ...]:
    """`stem`, `stage1`..`stage4`, then `final_norm` (pooled and normalised); no head."""
    return ("stem",) + numbered_stages(len(self.depths)) + ("final_norm",)

  def block_drop_path_rates(self) -> list[tuple[float, ...]]:
    """Per stage, each block's rate: linear from 0 (first block) to `drop_path_rate`."""
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate={self.drop_path_rate!r}: use a probability in "
                       "[0, 1), e.g. 0.1 (0 turns stochastic depth off).")
    total = sum(self.depths)
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(self.depths[:i]) for i in range(len(self.depths))]
    return [tuple(rates[s:s + d]) for s, d in zip(starts, self.depths)]

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_stages(self)
    rates = self.block_drop_path_rates()
    x = x.astype(self.dtype)
    if runs_stage(self, "stem"):
      x = Stem(self.widths[0], self.dtype, name="stem")(x)
      layers.sow_feature(self, "stem", x)
      if self.last_stage == "stem":
        return classifier_head(self, layers.global_avg_pool(x))
    for i, width in enumerate(self.widths):
      name = f"stage{i + 1}"
      if not runs_stage(self, name):
        continue
      x = ConvNeXtStage(width, rates[i], downsample=i > 0, dtype=self.dtype,
                        name=name)(x, train)
      layers.sow_feature(self, name, x)
      if name == self.last_stage:
        return classifier_head(self, layers.global_avg_pool(x))
    if runs_stage(self, "final_norm"):
      x = layer_norm(self.dtype, "final_norm")(layers.global_avg_pool(x))
      layers.sow_feature(self, "final_norm", x)
    return classifier_head(self, x)


class Stem(nn.Module):
  """4x4 convolution of stride 4 (non-overlapping patches), then LayerNorm."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.Conv(self.features, (4, 4), (4, 4), padding="VALID", dtype=self.dtype,
                    name="conv")(x)
    return layer_norm(self.dtype, "norm")(x)


# (blocks per stage, channels per stage), as torchvision and timm define the sizes.
CONVNEXT_SIZES = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}

MODELS = {name: functools.partial(ConvNeXt, depths=depths, widths=widths)
          for name, (depths, widths) in CONVNEXT_SIZES.items()}
convnext_tiny = MODELS["convnext_tiny"]
convnext_small = MODELS["convnext_small"]
convnext_base = MODELS["convnext_base"]
convnext_large = MODELS["convnext_large"]
