"""VGG networks as torchvision and Keras build them.

Parameter paths:

    stage{i}/conv{j}, stage{i}/bn{j}      five convolution stages, each ending in a max pool
    fc/dense1, fc/dense2                  the two 4096-wide hidden layers
    head

The flattened 7x7 map is in NHWC order here. torchvision flattens NCHW, so its
first dense layer's rows are permuted when its weights are converted
(`tlflax.weights.torchvision`); Keras flattens NHWC and needs no permutation.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from tlflax.models import layers
from tlflax.models.base import check_stages, classifier_head, numbered_stages, runs_stage

# Channels per convolution, grouped by stage (torchvision configurations A, B, D, E).
VGG_STAGES = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
  """VGG backbone with named stages (a `base.Backbone`).

  Attributes:
    stages: channels per convolution, one tuple per stage.
    batch_norm: BatchNorm after each convolution (torchvision `vgg*_bn`).
    num_classes: size of the `head` layer; `None` builds no head.
    hidden_size: width of `fc/dense1` and `fc/dense2`.
    dropout_rate: dropout after each hidden layer in training (0 for Keras).
    last_stage: truncate after this stage; a convolution stage is then
      globally average-pooled before the head.
    input_stage: the input is this stage's output; see `base.runs_stage`.
    dtype, frozen_batchnorm, head_init: as declared by `base.Backbone`.
    bn_epsilon, bn_momentum: BatchNorm settings of the `_bn` variants.

  Examples:
    >>> model = vgg(11)(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    >>> logits = model.apply(variables, images, train=False)
  """
  stages: Sequence[Sequence[int]]
  batch_norm: bool = False
  num_classes: Optional[int] = 1000
  hidden_size: int = 4096
  dropout_rate: float = 0.5
  last_stage: Optional[str] = None
  input_stage: Optional[str] = None
  dtype: Any = jnp.float32
  frozen_batchnorm: tuple[str, ...] = ()
  head_init: str = "lecun"
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9

  @property
  def stage_names(self) -> tuple[str, ...]:
    """The convolution stages, then `fc` (the hidden dense layers); no stem, no head."""
    return numbered_stages(len(self.stages)) + ("fc",)

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_stages(self)
    x = x.astype(self.dtype)
    for i, channels in enumerate(self.stages):
      name = f"stage{i + 1}"
      if not runs_stage(self, name):
        continue
      x = VGGStage(channels=tuple(channels), batch_norm=self.batch_norm,
                   dtype=self.dtype, norm=functools.partial(
                       layers.BatchNorm, momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon, dtype=self.dtype,
                       frozen_patterns=self.frozen_batchnorm),
                   name=name)(x, train)
      layers.sow_feature(self, name, x)
      if name == self.last_stage:
        return classifier_head(self, layers.global_avg_pool(x))
    if runs_stage(self, "fc"):
      x = layers.adaptive_avg_pool(x, (7, 7)).reshape(x.shape[0], -1)
      x = HiddenLayers(hidden_size=self.hidden_size, dropout_rate=self.dropout_rate,
                       dtype=self.dtype, name="fc")(x, train)
      layers.sow_feature(self, "fc", x)
    return classifier_head(self, x)


class VGGStage(nn.Module):
  """3x3 convolutions (+BN) with ReLU, then a 2x2 max pool."""
  channels: tuple[int, ...]
  batch_norm: bool
  norm: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for j, width in enumerate(self.channels):
      x = layers.Conv(width, (3, 3), padding=layers.symmetric_padding(1),
                  dtype=self.dtype, name=f"conv{j + 1}")(x)
      if self.batch_norm:
        x = self.norm(name=f"bn{j + 1}")(x, train)
      x = nn.relu(x)
    return nn.max_pool(x, (2, 2), (2, 2))


class HiddenLayers(nn.Module):
  """The two wide ReLU layers between the convolutions and the classifier."""
  hidden_size: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for name in ("dense1", "dense2"):
      x = nn.relu(nn.Dense(self.hidden_size, dtype=self.dtype, name=name)(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x


def vgg(depth: int, batch_norm: bool = False, **kwargs):
  """The constructor of VGG-`depth` (11, 13, 16 or 19), optionally with BatchNorm.

  Args:
    depth: one of `VGG_STAGES`.
    batch_norm: torchvision's `vgg*_bn` variants.
    **kwargs: other `VGG` fields fixed in the constructor (e.g. `dropout_rate`).

  Returns:
    A `functools.partial` of `VGG` taking the remaining fields.

  Examples:
    >>> model = vgg(16, batch_norm=True)(num_classes=10)
  """
  return functools.partial(VGG, stages=VGG_STAGES[depth], batch_norm=batch_norm, **kwargs)


keras_vgg16 = vgg(16, dropout_rate=0.0)
keras_vgg19 = vgg(19, dropout_rate=0.0)
