"""Xception (Chollet 2017) as keras.applications and timm (`legacy_xception`) build it.

timm's `legacy_xception` is Cadene's PyTorch port of the Keras network, with
the same layers in the same order; two details differ and change the numbers:

* The stride-2 3x3 max pools closing the entry-flow blocks: Keras pads them
  TF-style "same" (for an even input one pixel at the bottom/right only),
  timm pads one pixel on every side. They agree on odd inputs and differ on
  even ones (at 299 px, in the block that takes 74x74 to 37x37).
* BatchNorm epsilon: 1e-3 (Keras) and 1e-5 (PyTorch), momentum 0.99 and 0.1.

Separable convolutions are a depthwise 3x3 (one filter per channel, padded
to keep the size) followed by a pointwise 1x1, neither with a bias.

Stages follow the paper's three flows, the entry flow split at its
downsampling blocks so each stage is one resolution:

    stem     Keras block1 / timm conv1, conv2: two 3x3 convolutions (299 px: 147x147x64)
    stage1   entry-flow block, 128 channels  (Keras block2,  timm block1)   74x74
    stage2   entry-flow block, 256 channels  (Keras block3,  timm block2)   37x37
    stage3   entry-flow block, 728 channels  (Keras block4,  timm block3)   19x19
    stage4   middle flow, 8 blocks           (Keras block5-12, timm block4-11)  19x19
    stage5   exit flow: the 1024 block and the 1536 / 2048 separable convolutions
             (Keras block13-14, timm block12, conv3, conv4)  10x10x2048

Parameter paths:

    stem/conv1, stem/bn1, stem/conv2, stem/bn2
    stage{1,2,3}/block1/{shortcut_conv, shortcut_bn, sepconv{1,2}, bn{1,2}}
    stage4/block{1..8}/{sepconv{1,2,3}, bn{1,2,3}}
    stage5/block1/{shortcut_conv, shortcut_bn, sepconv{1,2}, bn{1,2}}
    stage5/block2/{sepconv{1,2}, bn{1,2}}
    head

with each `sepconvK` holding `depthwise` and `pointwise` convolutions.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from tlflax.models import layers
from tlflax.models.base import (ModuleDef, check_stages, classifier_head, numbered_stages,
                                runs_stage)

POOL_PADDINGS = ("tf_same", "symmetric")

# Entry-flow stages: output channels of each one-block stage.
ENTRY_CHANNELS = (128, 256, 728)
MIDDLE_BLOCKS = 8


class SeparableConv(nn.Module):
  """Depthwise 3x3 (size kept) then pointwise 1x1, no biases."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = layers.Conv(channels, (3, 3), padding=layers.symmetric_padding(1),
                    feature_group_count=channels, use_bias=False, dtype=self.dtype,
                    name="depthwise")(x)
    return layers.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                       name="pointwise")(x)


def max_pool_3x3_stride2(x, pool_padding: str):
  """The entry and exit blocks' downsampling pool (see the module doc)."""
  if pool_padding == "tf_same":
    return nn.max_pool(x, (3, 3), (2, 2), padding="SAME")  # lax's SAME is TF's
  return nn.max_pool(x, (3, 3), (2, 2), padding=layers.symmetric_padding(1))


class SeparableBlock(nn.Module):
  """[ReLU, separable conv, BN] x len(widths), then optionally a pool and a shortcut.

  Attributes:
    widths: output channels of each separable convolution.
    downsample: end with the stride-2 max pool and add a 1x1 stride-2
      projection of the block input (entry/exit flow); otherwise add the
      input itself (middle flow).
    relu_first: ReLU before the first convolution (all blocks but stage1's,
      whose input comes out of the stem's ReLU).
    pool_padding: "tf_same" (Keras) or "symmetric" (timm).
  """
  widths: tuple[int, ...]
  downsample: bool
  relu_first: bool
  pool_padding: str
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = x
    for k, width in enumerate(self.widths, start=1):
      if k > 1 or self.relu_first:
        y = nn.relu(y)
      y = SeparableConv(width, dtype=self.dtype, name=f"sepconv{k}")(y)
      y = self.norm(name=f"bn{k}")(y, train)
    if not self.downsample:
      return y + x
    y = max_pool_3x3_stride2(y, self.pool_padding)
    shortcut = layers.Conv(self.widths[-1], (1, 1), (2, 2), use_bias=False, dtype=self.dtype,
                           name="shortcut_conv")(x)
    return y + self.norm(name="shortcut_bn")(shortcut, train)


class ExitConvs(nn.Module):
  """The exit flow's last two separable convolutions, each with BN and ReLU."""
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for k, width in enumerate((1536, 2048), start=1):
      x = SeparableConv(width, dtype=self.dtype, name=f"sepconv{k}")(x)
      x = nn.relu(self.norm(name=f"bn{k}")(x, train))
    return x


class XceptionStage(nn.Module):
  """One stage of `Xception` (see the module doc for which blocks it holds)."""
  index: int  # 1..5
  pool_padding: str
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = functools.partial(SeparableBlock, pool_padding=self.pool_padding, norm=self.norm,
                              dtype=self.dtype)
    if self.index <= len(ENTRY_CHANNELS):
      width = ENTRY_CHANNELS[self.index - 1]
      return block((width, width), downsample=True, relu_first=self.index > 1,
                   name="block1")(x, train)
    if self.index == 4:
      for j in range(1, MIDDLE_BLOCKS + 1):
        x = block((728, 728, 728), downsample=False, relu_first=True,
                  name=f"block{j}")(x, train)
      return x
    x = block((728, 1024), downsample=True, relu_first=True, name="block1")(x, train)
    return ExitConvs(self.norm, dtype=self.dtype, name="block2")(x, train)


class Stem(nn.Module):
  """Two unpadded 3x3 convolutions (the first with stride 2), each with BN and ReLU."""
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for k, (width, strides) in enumerate(((32, 2), (64, 1)), start=1):
      x = layers.Conv(width, (3, 3), (strides, strides), padding="VALID", use_bias=False,
                      dtype=self.dtype, name=f"conv{k}")(x)
      x = nn.relu(self.norm(name=f"bn{k}")(x, train))
    return x


class Xception(nn.Module):
  """Xception backbone with named stages (a `base.Backbone`); see the module doc.

  Attributes:
    num_classes: size of the `head` layer; `None` builds no head and returns
      the pooled 2048 features.
    pool_padding: "tf_same" (Keras) or "symmetric" (timm) for the stride-2
      max pools.
    last_stage, input_stage, dtype, frozen_batchnorm, head_init: as declared
      by `base.Backbone`.
    bn_epsilon, bn_momentum: BatchNorm settings (flax momentum convention).

  Examples:
    >>> model = keras_xception(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
    >>> logits = model.apply(variables, images, train=False)
  """
  num_classes: Optional[int] = 1000
  pool_padding: str = "tf_same"
  last_stage: Optional[str] = None
  input_stage: Optional[str] = None
  dtype: Any = jnp.float32
  frozen_batchnorm: tuple[str, ...] = ()
  head_init: str = "lecun"
  bn_epsilon: float = 1e-3
  bn_momentum: float = 0.99

  @property
  def stage_names(self) -> tuple[str, ...]:
    """Stages from input to output, without the head."""
    return ("stem",) + numbered_stages(5)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.pool_padding not in POOL_PADDINGS:
      raise ValueError(f"pool_padding={self.pool_padding!r}: use one of "
                       f"{', '.join(POOL_PADDINGS)}.")
    norm = functools.partial(layers.BatchNorm, momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon, dtype=self.dtype,
                             frozen_patterns=self.frozen_batchnorm)
    check_stages(self)
    x = x.astype(self.dtype)
    if runs_stage(self, "stem"):
      x = Stem(norm, dtype=self.dtype, name="stem")(x, train)
      layers.sow_feature(self, "stem", x)
    if self.last_stage != "stem":
      for index, name in enumerate(self.stage_names[1:], start=1):
        if not runs_stage(self, name):
          continue
        x = XceptionStage(index, self.pool_padding, norm, dtype=self.dtype,
                          name=name)(x, train)
        layers.sow_feature(self, name, x)
        if name == self.last_stage:
          break
    return classifier_head(self, layers.global_avg_pool(x))


# keras.applications `Xception`.
keras_xception = functools.partial(Xception)
# timm `legacy_xception` (Cadene's port): symmetric pools, PyTorch BatchNorm.
legacy_xception = functools.partial(Xception, pool_padding="symmetric", bn_epsilon=1e-5,
                                    bn_momentum=0.9)

MODELS = {"keras_xception": keras_xception, "legacy_xception": legacy_xception}
