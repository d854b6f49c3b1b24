"""ResNets exactly as `keras.applications` builds them (v1 and pre-activation v2).

These differ from torchvision's ResNets in ways that change the numbers, so
Keras weights only reproduce Keras outputs on this structure:

* v1 puts the stride on the first 1x1 convolution of a block (torchvision on
  the 3x3), every convolution has a bias, and the first block of every stage
  (stage1 included) has a projection shortcut.
* v2 (He et al., "Identity Mappings in Deep Residual Networks") normalises
  before each block, strides in the *last* block of stages 1-3 with a 1x1
  max-pool shortcut, and ends with a BatchNorm + ReLU (`post_bn`).
* BatchNorm epsilon is 1.001e-5 and momentum 0.99 (the same number in flax).
* Padding is explicit zero padding (Keras' `ZeroPadding2D`), also in front of
  the stem's max pool, where v2 pools values that may be negative.

Parameter paths:

    stem/conv, stem/bn (v1 only)
    stage{i}/block{j}/conv{k}, stage{i}/block{j}/bn{k}
    stage{i}/block{j}/shortcut_conv, stage{i}/block{j}/shortcut_bn (v1 only)
    stage{i}/block{j}/preact_bn                     (v2)
    stage4/post_bn                                  (v2)
    head

Stage i is Keras' `conv{i+1}` (Keras counts the stem as conv1). v2's final
`post_bn` + ReLU lives inside the last stage, so the last stage's feature is
what Keras returns with `include_top=False`, and freezing that stage freezes
it too. The other v2 stage features are Keras' `*_out` sums, which are not
normalised; a v2 model truncated with `last_stage` has no `post_bn`.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from tlflax.models import layers
from tlflax.models.base import (ModuleDef, check_stages, classifier_head, numbered_stages,
                                runs_stage)

# Keras' BatchNormalization settings in keras.applications' ResNets.
KERAS_BN_EPSILON = 1.001e-5
# Keras: moving = moving * 0.99 + batch * 0.01; flax uses the same convention.
KERAS_BN_MOMENTUM = 0.99


def zero_pad(x: jnp.ndarray, amount: int) -> jnp.ndarray:
  """Keras' `ZeroPadding2D(amount)` on NHWC input."""
  return jnp.pad(x, ((0, 0), (amount, amount), (amount, amount), (0, 0)))


class BlockV1(nn.Module):
  """Keras `residual_block_v1`: 1x1 (stride) -> 3x3 -> 1x1, post-activation."""
  filters: int
  strides: int
  projection: bool
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = False):
    stride = (self.strides, self.strides)
    if self.projection:
      shortcut = self.conv(4 * self.filters, (1, 1), stride, name="shortcut_conv")(x)
      shortcut = self.norm(name="shortcut_bn")(shortcut, train)
    else:
      shortcut = x
    y = self.conv(self.filters, (1, 1), stride, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y, train))
    y = self.conv(self.filters, (3, 3), padding=layers.symmetric_padding(1),
                  name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y, train))
    y = self.conv(4 * self.filters, (1, 1), name="conv3")(y)
    y = self.norm(name="bn3")(y, train)
    return nn.relu(shortcut + y)


class BlockV2(nn.Module):
  """Keras `residual_block_v2`: BN-ReLU first, stride on the 3x3, no final ReLU."""
  filters: int
  strides: int
  projection: bool
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = False):
    stride = (self.strides, self.strides)
    preact = nn.relu(self.norm(name="preact_bn")(x, train))
    if self.projection:
      # Keras projects the normalised input, but keeps the raw input otherwise.
      shortcut = self.conv(4 * self.filters, (1, 1), stride, name="shortcut_conv")(preact)
    else:
      # Keras' MaxPooling2D(1, strides) is plain subsampling.
      shortcut = x[:, ::self.strides, ::self.strides, :]
    y = self.conv(self.filters, (1, 1), use_bias=False, name="conv1")(preact)
    y = nn.relu(self.norm(name="bn1")(y, train))
    y = self.conv(self.filters, (3, 3), stride, padding=layers.symmetric_padding(1),
                  use_bias=False, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y, train))
    y = self.conv(4 * self.filters, (1, 1), name="conv3")(y)
    return shortcut + y


class KerasStage(nn.Module):
  """Keras `stack_residual_blocks_v1`/`_v2`: a run of blocks named block1..N.

  Attributes:
    preact: v2 blocks (stride on the last block, projection without stride on
      the first) instead of v1 (stride and projection on the first block).
    post_norm: end with v2's `post_bn` + ReLU (the network's last stage).
  """
  num_blocks: int
  filters: int
  strides: int
  preact: bool
  conv: ModuleDef
  norm: ModuleDef
  post_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = BlockV2 if self.preact else BlockV1
    for j in range(1, self.num_blocks + 1):
      if self.preact:
        strides = self.strides if j == self.num_blocks else 1
      else:
        strides = self.strides if j == 1 else 1
      x = block(filters=self.filters, strides=strides, projection=j == 1,
                conv=self.conv, norm=self.norm, name=f"block{j}")(x, train)
    if self.post_norm:
      x = nn.relu(self.norm(name="post_bn")(x, train))
    return x


class KerasStem(nn.Module):
  """7x7/2 conv (with bias), [BN, ReLU] for v1, then a zero-padded 3x3/2 max pool."""
  preact: bool
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.conv(64, (7, 7), (2, 2), padding=layers.symmetric_padding(3), name="conv")(x)
    if not self.preact:
      x = nn.relu(self.norm(name="bn")(x, train))
    # Zeros, not -inf: v2 pools un-normalised values that may all be negative.
    return nn.max_pool(zero_pad(x, 1), (3, 3), (2, 2), padding="VALID")


class KerasResNet(nn.Module):
  """A keras.applications ResNet / ResNetV2 backbone with named stages (a `base.Backbone`).

  Attributes:
    stage_sizes: blocks per stage.
    preact: ResNetV2 (pre-activation) instead of ResNet v1.
    num_classes: size of the `head` layer; `None` builds no head and returns
      the pooled features. The head returns logits (Keras applies softmax).
    last_stage: truncate after this stage ("stem", "stage1", ...).
    input_stage: the input is this stage's output; see `base.runs_stage`.
    dtype: computation dtype (parameters stay float32).
    frozen_batchnorm: regexes over BatchNorm module paths held in inference
      mode (see `layers.BatchNorm`).
    head_init: "lecun" or "zeros" for a new head (see `base.Backbone`).
    bn_epsilon, bn_momentum: Keras' BatchNorm settings.

  Examples:
    >>> model = keras_resnet50(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    >>> logits = model.apply(variables, images, train=False)
  """
  stage_sizes: Sequence[int]
  preact: bool = False
  num_classes: Optional[int] = 1000
  last_stage: Optional[str] = None
  input_stage: Optional[str] = None
  dtype: Any = jnp.float32
  frozen_batchnorm: tuple[str, ...] = ()
  head_init: str = "lecun"
  bn_epsilon: float = KERAS_BN_EPSILON
  bn_momentum: float = KERAS_BN_MOMENTUM

  @property
  def stage_names(self) -> tuple[str, ...]:
    """Stages from input to output, without the head."""
    return ("stem",) + numbered_stages(len(self.stage_sizes))

  @nn.compact
  def __call__(self, x, train: bool = False):
    # Keras' Conv2D has a bias unless told otherwise; v2 turns some off.
    conv = functools.partial(layers.Conv, use_bias=True, padding="VALID", dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon, dtype=self.dtype,
                             frozen_patterns=self.frozen_batchnorm)
    check_stages(self)
    x = x.astype(self.dtype)

    if runs_stage(self, "stem"):
      x = KerasStem(preact=self.preact, conv=conv, norm=norm, name="stem")(x, train)
      layers.sow_feature(self, "stem", x)
    if self.last_stage != "stem":
      last = len(self.stage_sizes) - 1
      for i, num_blocks in enumerate(self.stage_sizes):
        name = f"stage{i + 1}"
        if self.preact:  # v2 strides out of every stage but the last
          strides = 1 if i == last else 2
        else:  # v1 strides into every stage but the first
          strides = 1 if i == 0 else 2
        if not runs_stage(self, name):
          continue
        x = KerasStage(num_blocks=num_blocks, filters=64 * 2**i, strides=strides,
                       preact=self.preact, conv=conv, norm=norm,
                       post_norm=self.preact and i == last, name=name)(x, train)
        layers.sow_feature(self, name, x)
        if name == self.last_stage:
          break
    return classifier_head(self, layers.global_avg_pool(x))


keras_resnet50 = functools.partial(KerasResNet, stage_sizes=(3, 4, 6, 3))
keras_resnet101 = functools.partial(KerasResNet, stage_sizes=(3, 4, 23, 3))
keras_resnet152 = functools.partial(KerasResNet, stage_sizes=(3, 8, 36, 3))
keras_resnet50v2 = functools.partial(KerasResNet, stage_sizes=(3, 4, 6, 3), preact=True)
keras_resnet101v2 = functools.partial(KerasResNet, stage_sizes=(3, 4, 23, 3), preact=True)
keras_resnet152v2 = functools.partial(KerasResNet, stage_sizes=(3, 8, 36, 3), preact=True)
