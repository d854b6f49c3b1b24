"""EfficientNet (B0-B7) and EfficientNetV2 (S, M, L) as torchvision and Keras build them.

One structure serves both publishers; the constructors fix what differs:

* torchvision (`efficientnet_b0` ... `efficientnet_b7`, `efficientnet_v2_s/m/l`)
  pads every convolution symmetrically by (k - 1) / 2. BatchNorm is eps 1e-5,
  momentum 0.1 for B0-B4; eps 1e-3, momentum 0.01 for B5-B7; eps 1e-3,
  momentum 0.1 for V2 (flax's momentum is one minus PyTorch's).
* Keras (`keras_efficientnet_b0` ... `keras_efficientnet_b7`) pads a stride-2
  convolution with `imagenet_utils.correct_pad`: (k//2 - 1, k//2) on an even
  side, (k//2, k//2) on an odd one, judged from the actual input, as a Keras
  model built for that input size does. BatchNorm is eps 1e-3, momentum 0.99.
  Keras' `Rescaling` and `Normalization` layers are *not* part of this
  network: tlflax models take normalised images, so their constants are the
  weights' preprocessing (`tlflax.weights.efficientnet`), and the converter
  checks the file's Normalization statistics against them.

Stages follow the publishers' own boundaries: `stem` is torchvision's
`features[0]` (Keras `stem_*`), `stage{i}` is `features[i]` (Keras
`block{i}*`), and `top`, the final 1x1 convolution + BatchNorm + SiLU, is
torchvision's last `features` entry (Keras `top_conv`/`top_bn`). The `top`
feature is what Keras returns with `include_top=False`. Parameter paths:

    stem/conv, stem/bn
    stage{i}/block{j}/expand_conv, expand_bn      (MBConv with expansion)
    stage{i}/block{j}/dwconv, dw_bn               (MBConv's depthwise convolution)
    stage{i}/block{j}/se/reduce, se/expand        (squeeze-excitation, with biases)
    stage{i}/block{j}/fused_conv, fused_bn        (V2's fused MBConv)
    stage{i}/block{j}/project_conv, project_bn    (every block but a fused one without expansion)
    top/conv, top/bn
    head

Two options serve EfficientNet-Lite (`tlflax.models.efficientnet_lite`), Google's
variant for integer accelerators: `activation="relu6"` in place of SiLU (stem,
blocks and top) and `squeeze_excite=False` (its blocks have none).

Stochastic depth (`stochastic_depth_rate`, off by default) drops a residual
block's branch per example in training, at `rate * block_index / num_blocks`
as both publishers schedule it; it needs a "dropout" rng, as does the
classifier dropout (`dropout_rate`, the publishers' value by default).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.models import layers
from tlflax.models.base import ModuleDef, check_stages, classifier_head, numbered_stages, runs_stage

TORCH_PADDING = "torch"
KERAS_PADDING = "keras"
# The `activation` option's values: SiLU (EfficientNet) or ReLU6 (EfficientNet-Lite).
ACTIVATIONS: dict[str, Callable] = {"silu": nn.silu, "relu6": nn.relu6}


class StageSpec(NamedTuple):
  """One stage of blocks, with channels already scaled for the variant.

  Attributes:
    fused: V2's fused MBConv (one k x k convolution instead of 1x1 + depthwise).
    expand_ratio: expanded channels = in_channels * expand_ratio.
    kernel: the spatial convolution's size.
    stride: of the stage's first block.
    in_channels, out_channels: of the stage's first block / of every block.
    num_blocks: blocks in the stage.
  """
  fused: bool
  expand_ratio: int
  kernel: int
  stride: int
  in_channels: int
  out_channels: int
  num_blocks: int


def round_channels(channels: float, divisor: int = 8) -> int:
  """Nearest multiple of `divisor`, never 10% below `channels` (both publishers' rule).

  Examples:
    >>> round_channels(32 * 1.1)
    32
  """
  rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * channels else rounded


# EfficientNet-B0 (Tan & Le 2019, table 1): expand ratio, kernel, stride,
# input and output channels, blocks. B1-B7 scale channels and block counts.
_B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
              (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
              (6, 3, 1, 192, 320, 1))


def scaled_b0_stages(width: float, depth: float) -> tuple[StageSpec, ...]:
  """B0's stages with channels times `width` (rounded) and blocks times `depth` (ceiling)."""
  return tuple(StageSpec(False, expand, kernel, stride, round_channels(cin * width),
                         round_channels(cout * width), int(math.ceil(blocks * depth)))
               for expand, kernel, stride, cin, cout, blocks in _B0_STAGES)


def _v2_stages(rows) -> tuple[StageSpec, ...]:
  """EfficientNetV2 rows (fused, expand, kernel, stride, in, out, blocks), unscaled."""
  return tuple(StageSpec(*row) for row in rows)


# EfficientNetV2 (Tan & Le 2021, table 4, and torchvision's M and L).
V2_S_STAGES = _v2_stages((
    (True, 1, 3, 1, 24, 24, 2), (True, 4, 3, 2, 24, 48, 4), (True, 4, 3, 2, 48, 64, 4),
    (False, 4, 3, 2, 64, 128, 6), (False, 6, 3, 1, 128, 160, 9),
    (False, 6, 3, 2, 160, 256, 15)))
V2_M_STAGES = _v2_stages((
    (True, 1, 3, 1, 24, 24, 3), (True, 4, 3, 2, 24, 48, 5), (True, 4, 3, 2, 48, 80, 5),
    (False, 4, 3, 2, 80, 160, 7), (False, 6, 3, 1, 160, 176, 14),
    (False, 6, 3, 2, 176, 304, 18), (False, 6, 3, 1, 304, 512, 5)))
V2_L_STAGES = _v2_stages((
    (True, 1, 3, 1, 32, 32, 4), (True, 4, 3, 2, 32, 64, 7), (True, 4, 3, 2, 64, 96, 7),
    (False, 4, 3, 2, 96, 192, 10), (False, 6, 3, 1, 192, 224, 19),
    (False, 6, 3, 2, 224, 384, 25), (False, 6, 3, 1, 384, 640, 7)))


def conv_padding(style: str, x, kernel: int, stride: int):
  """Explicit ((top, bottom), (left, right)) padding of one convolution.

  torchvision pads (k - 1) / 2 on every side. Keras pads stride 1 "same"
  (the same, for odd kernels) and stride 2 with `correct_pad`: one pixel
  less at the top/left of an even side, where the window ends on the edge.
  """
  half = kernel // 2
  if style == TORCH_PADDING or stride == 1:
    return layers.symmetric_padding((kernel - 1) // 2)
  height, width = x.shape[1], x.shape[2]
  return ((half - (1 - height % 2), half), (half - (1 - width % 2), half))


class SqueezeExcite(nn.Module):
  """Global average -> 1x1 conv -> SiLU -> 1x1 conv -> sigmoid, scaling the channels."""
  squeeze_channels: int
  conv: ModuleDef

  @nn.compact
  def __call__(self, x):
    scale = jnp.mean(x, axis=(1, 2), keepdims=True)
    scale = nn.silu(self.conv(self.squeeze_channels, (1, 1), use_bias=True, name="reduce")(scale))
    scale = self.conv(x.shape[-1], (1, 1), use_bias=True, name="expand")(scale)
    return x * nn.sigmoid(scale)


class MBConv(nn.Module):
  """Inverted residual block: [1x1 expand], depthwise k x k, squeeze-excite, 1x1 project.

  With `fused`, V2's variant: one k x k convolution expands (and strides),
  there is no squeeze-excitation, and a 1x1 projection follows only when it
  expanded. Without `squeeze_excite` (Lite) no block has one. A block whose
  stride is 1 and width unchanged adds its input, its branch dropped per
  example with probability `drop_rate` in training.
  """
  spec: StageSpec
  in_channels: int
  stride: int
  drop_rate: float
  padding: str
  conv: ModuleDef
  norm: ModuleDef
  activation: Callable = nn.silu
  squeeze_excite: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec = self.spec
    expanded = self.in_channels * spec.expand_ratio
    strides = (self.stride, self.stride)
    pad = conv_padding(self.padding, x, spec.kernel, self.stride)
    y = x
    if spec.fused:
      y = self.conv(expanded if spec.expand_ratio != 1 else spec.out_channels,
                    (spec.kernel, spec.kernel), strides, padding=pad, name="fused_conv")(y)
      y = self.activation(self.norm(name="fused_bn")(y, train))
    else:
      if spec.expand_ratio != 1:
        y = self.conv(expanded, (1, 1), name="expand_conv")(y)
        y = self.activation(self.norm(name="expand_bn")(y, train))
      y = self.conv(expanded, (spec.kernel, spec.kernel), strides, padding=pad,
                    feature_group_count=expanded, name="dwconv")(y)
      y = self.activation(self.norm(name="dw_bn")(y, train))
      if self.squeeze_excite:
        y = SqueezeExcite(max(1, self.in_channels // 4), self.conv, name="se")(y)
    if not (spec.fused and spec.expand_ratio == 1):
      y = self.conv(spec.out_channels, (1, 1), name="project_conv")(y)
      y = self.norm(name="project_bn")(y, train)
    if self.stride != 1 or self.in_channels != spec.out_channels:
      return y
    if train and self.drop_rate > 0:
      survival = 1.0 - self.drop_rate
      keep = jax.random.bernoulli(self.make_rng("dropout"), survival, (y.shape[0], 1, 1, 1))
      y = y * keep.astype(y.dtype) / survival
    return y + x


class EfficientNet(nn.Module):
  """An EfficientNet / EfficientNetV2 backbone with named stages (a `base.Backbone`).

  Attributes:
    stages: the stage specifications (see `StageSpec`).
    top_channels: width of the final 1x1 convolution (`top`).
    padding: "torch" (symmetric) or "keras" (`correct_pad` on stride 2).
    num_classes: size of the `head` layer; `None` builds no head and returns
      the pooled features.
    dropout_rate: dropout before the head in training (the publisher's value).
    stochastic_depth_rate: the last block's drop probability in training;
      0 (the default) turns stochastic depth off.
    last_stage: truncate after this stage ("stem", "stage1", ..., "top").
    input_stage: the input is this stage's output; see `base.runs_stage`.
    dtype: computation dtype (parameters stay float32).
    frozen_batchnorm: regexes over BatchNorm module paths held in inference
      mode (see `layers.BatchNorm`).
    head_init: "lecun" or "zeros" for a new head (see `base.Backbone`).
    bn_epsilon, bn_momentum: BatchNorm settings (flax momentum).
    activation: "silu" (EfficientNet) or "relu6" (EfficientNet-Lite), after
      every BatchNorm but the projections'.
    squeeze_excite: whether the MBConv blocks have squeeze-excitation (not
      in Lite).

  Examples:
    >>> model = efficientnet_b0(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    >>> logits = model.apply(variables, images, train=False)
  """
  stages: tuple[StageSpec, ...]
  top_channels: int = 1280
  padding: str = TORCH_PADDING
  num_classes: Optional[int] = 1000
  dropout_rate: float = 0.2
  stochastic_depth_rate: float = 0.0
  last_stage: Optional[str] = None
  input_stage: Optional[str] = None
  dtype: Any = jnp.float32
  frozen_batchnorm: tuple[str, ...] = ()
  head_init: str = "lecun"
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9
  activation: str = "silu"
  squeeze_excite: bool = True

  @property
  def stage_names(self) -> tuple[str, ...]:
    """Stages from input to output, without the head."""
    return ("stem",) + numbered_stages(len(self.stages)) + ("top",)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.padding not in (TORCH_PADDING, KERAS_PADDING):
      raise ValueError(f"padding={self.padding!r}: use {TORCH_PADDING!r} or {KERAS_PADDING!r}.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}: use one of {', '.join(ACTIVATIONS)}.")
    activation = ACTIVATIONS[self.activation]
    if not 0.0 <= self.stochastic_depth_rate < 1.0:
      raise ValueError(f"stochastic_depth_rate={self.stochastic_depth_rate!r}: use a "
                       "probability in [0, 1); 0 turns stochastic depth off.")
    conv = functools.partial(layers.Conv, use_bias=False, padding="VALID", dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon, dtype=self.dtype,
                             frozen_patterns=self.frozen_batchnorm)
    check_stages(self)
    x = x.astype(self.dtype)
    total_blocks = sum(spec.num_blocks for spec in self.stages)
    block_index = 0
    for name in self.stage_names:
      if name == "stem":
        run = functools.partial(Stem, self.stages[0].in_channels, self.padding, conv, norm,
                                activation)
      elif name == "top":
        run = functools.partial(Top, self.top_channels, conv, norm, activation)
      else:
        spec = self.stages[int(name[len("stage"):]) - 1]
        first_rate = self.stochastic_depth_rate * block_index / total_blocks
        step = self.stochastic_depth_rate / total_blocks
        block_index += spec.num_blocks
        run = functools.partial(Stage, spec, first_rate, step, self.padding, conv, norm,
                                activation, self.squeeze_excite)
      if runs_stage(self, name):
        x = run(name=name)(x, train)
        layers.sow_feature(self, name, x)
      if name == self.last_stage:
        break
    x = layers.global_avg_pool(x)
    if self.num_classes is not None and self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return classifier_head(self, x)


class Stem(nn.Module):
  """3x3 stride-2 convolution, BatchNorm, activation (SiLU or ReLU6)."""
  channels: int
  padding: str
  conv: ModuleDef
  norm: ModuleDef
  activation: Callable = nn.silu

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.conv(self.channels, (3, 3), (2, 2), padding=conv_padding(self.padding, x, 3, 2),
                  name="conv")(x)
    return self.activation(self.norm(name="bn")(x, train))


class Stage(nn.Module):
  """`spec.num_blocks` blocks; the first strides and changes the width.

  Block j's stochastic depth rate is `first_rate + j * rate_step`.
  """
  spec: StageSpec
  first_rate: float
  rate_step: float
  padding: str
  conv: ModuleDef
  norm: ModuleDef
  activation: Callable = nn.silu
  squeeze_excite: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    for j in range(self.spec.num_blocks):
      x = MBConv(self.spec, in_channels=self.spec.in_channels if j == 0 else self.spec.out_channels,
                 stride=self.spec.stride if j == 0 else 1,
                 drop_rate=self.first_rate + j * self.rate_step, padding=self.padding,
                 conv=self.conv, norm=self.norm, activation=self.activation,
                 squeeze_excite=self.squeeze_excite, name=f"block{j + 1}")(x, train)
    return x


class Top(nn.Module):
  """The final 1x1 convolution, BatchNorm, activation (SiLU or ReLU6)."""
  channels: int
  conv: ModuleDef
  norm: ModuleDef
  activation: Callable = nn.silu

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.conv(self.channels, (1, 1), name="conv")(x)
    return self.activation(self.norm(name="bn")(x, train))


# (width, depth, dropout) of B0-B7, the same in torchvision and Keras.
B_SCALING = {
    "b0": (1.0, 1.0, 0.2), "b1": (1.0, 1.1, 0.2), "b2": (1.1, 1.2, 0.3),
    "b3": (1.2, 1.4, 0.3), "b4": (1.4, 1.8, 0.4), "b5": (1.6, 2.2, 0.4),
    "b6": (1.8, 2.6, 0.5), "b7": (2.0, 3.1, 0.5),
}
# torchvision's BatchNorm for B5-B7 (ported from lukemelas' TF port) and V2:
# eps 1e-3 with PyTorch momentum 0.01 (flax 0.99) and 0.1 (flax 0.9).
_TORCH_BATCHNORM = {"b5": (1e-3, 0.99), "b6": (1e-3, 0.99), "b7": (1e-3, 0.99)}
KERAS_BN_EPSILON = 1e-3
KERAS_BN_MOMENTUM = 0.99  # Keras: moving * 0.99 + batch * 0.01, flax's convention


def _b_variant(variant: str, padding: str):
  width, depth, dropout = B_SCALING[variant]
  if padding == KERAS_PADDING:
    epsilon, momentum = KERAS_BN_EPSILON, KERAS_BN_MOMENTUM
  else:
    epsilon, momentum = _TORCH_BATCHNORM.get(variant, (1e-5, 0.9))
  return functools.partial(EfficientNet, stages=scaled_b0_stages(width, depth),
                           top_channels=round_channels(1280 * width), padding=padding,
                           dropout_rate=dropout, bn_epsilon=epsilon, bn_momentum=momentum)


def _v2_variant(stages, dropout: float):
  return functools.partial(EfficientNet, stages=stages, top_channels=1280, dropout_rate=dropout,
                           bn_epsilon=1e-3, bn_momentum=0.9)


MODELS = {
    **{f"efficientnet_{v}": _b_variant(v, TORCH_PADDING) for v in B_SCALING},
    "efficientnet_v2_s": _v2_variant(V2_S_STAGES, 0.2),
    "efficientnet_v2_m": _v2_variant(V2_M_STAGES, 0.3),
    "efficientnet_v2_l": _v2_variant(V2_L_STAGES, 0.4),
    **{f"keras_efficientnet_{v}": _b_variant(v, KERAS_PADDING) for v in B_SCALING},
}
