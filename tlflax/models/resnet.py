"""ResNets as torchvision builds them, and the CIFAR ResNets of He et al. 2016.

Parameter paths (what freezing rules and weight converters refer to):

    stem/conv, stem/bn
    stage{i}/block{j}/conv{k}, stage{i}/block{j}/bn{k}
    stage{i}/block{j}/downsample_conv, stage{i}/block{j}/downsample_bn
    head

Stages are numbered from 1 like torchvision's `layer1..layer4`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from tlflax.models import layers
from tlflax.models.base import (ModuleDef, check_stages, classifier_head, numbered_stages,
                                runs_stage)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions plus a shortcut (ResNet-18/34 and CIFAR ResNets)."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  shortcut: str = "projection"  # "projection" (1x1 conv + BN) or "pad" (option A)
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides),
                  padding=layers.symmetric_padding(1), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y, train))
    y = self.conv(self.filters, (3, 3), padding=layers.symmetric_padding(1),
                  name="conv2")(y)
    y = self.norm(name="bn2")(y, train)
    if residual.shape != y.shape:
      residual = _shortcut(self, residual, self.filters, train)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, groups) -> 1x1 with 4x expansion (torchvision v1.5)."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  groups: int = 1
  base_width: int = 64
  shortcut: str = "projection"
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    width = int(self.filters * (self.base_width / 64.0)) * self.groups
    residual = x
    y = self.conv(width, (1, 1), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y, train))
    y = self.conv(width, (3, 3), (self.strides, self.strides),
                  padding=layers.symmetric_padding(1),
                  feature_group_count=self.groups, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y, train))
    y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
    y = self.norm(name="bn3")(y, train)
    if residual.shape != y.shape:
      residual = _shortcut(self, residual, self.filters * 4, train)
    return nn.relu(y + residual)


def _shortcut(block, x, out_channels, train):
  """Matches the residual to the block output when stride or width change."""
  if block.shortcut == "pad":
    # "Option A": subsample by the stride, zero-pad the new channels. No weights.
    x = x[:, ::block.strides, ::block.strides, :]
    extra = out_channels - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  x = block.conv(out_channels, (1, 1), (block.strides, block.strides),
                 name="downsample_conv")(x)
  return block.norm(name="downsample_bn")(x, train)


class ResNetStage(nn.Module):
  """A run of blocks; the first one carries the stride."""
  block: ModuleDef
  num_blocks: int
  filters: int
  strides: int
  block_options: dict

  @nn.compact
  def __call__(self, x, train: bool = False):
    for j in range(self.num_blocks):
      x = self.block(filters=self.filters, strides=self.strides if j == 0 else 1,
                     name=f"block{j + 1}", **self.block_options)(x, train)
    return x


class ResNet(nn.Module):
  """ResNet backbone with named stages (a `base.Backbone`).

  Attributes:
    stage_sizes: blocks per stage.
    block: `BasicBlock` or `Bottleneck`.
    num_classes: size of the `head` layer; `None` builds no head and returns
      the pooled features.
    groups, width_per_group: ResNeXt / wide ResNet settings.
    cifar_stem: the CIFAR variant (3x3 stem conv without max pool, 16-32-64
      channels, parameter-free "option A" shortcuts).
    last_stage: truncate the network after this stage (e.g. "stage3"); the
      head, if any, then sits on that stage's pooled output.
    input_stage: the input is this stage's output (e.g. cached features) and
      the network runs from the next stage on; see `base.runs_stage`.
    dtype: computation dtype (parameters stay float32).
    frozen_batchnorm: regexes over BatchNorm module paths held in inference
      mode (see `layers.BatchNorm`).
    head_init: "lecun" or "zeros" for a new head (see `base.Backbone`).
    bn_epsilon, bn_momentum: BatchNorm settings (PyTorch momentum 0.1 is
      flax momentum 0.9).

  Examples:
    >>> model = resnet50(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    >>> logits = model.apply(variables, images, train=False)
  """
  stage_sizes: Sequence[int]
  block: ModuleDef = BasicBlock
  num_classes: Optional[int] = 1000
  groups: int = 1
  width_per_group: int = 64
  cifar_stem: bool = False
  last_stage: Optional[str] = None
  input_stage: Optional[str] = None
  dtype: Any = jnp.float32
  frozen_batchnorm: tuple[str, ...] = ()
  head_init: str = "lecun"
  bn_epsilon: float = 1e-5
  bn_momentum: float = 0.9

  @property
  def stage_names(self) -> tuple[str, ...]:
    """Stages from input to output, without the head."""
    return ("stem",) + numbered_stages(len(self.stage_sizes))

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(layers.Conv, use_bias=False, dtype=self.dtype,
                             padding="VALID")
    norm = functools.partial(layers.BatchNorm, momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon, dtype=self.dtype,
                             frozen_patterns=self.frozen_batchnorm)
    check_stages(self)
    x = x.astype(self.dtype)

    if runs_stage(self, "stem"):
      x = Stem(cifar=self.cifar_stem, conv=conv, norm=norm, name="stem")(x, train)
      layers.sow_feature(self, "stem", x)
    if self.last_stage != "stem":
      base = 16 if self.cifar_stem else 64
      block_options = dict(conv=conv, norm=norm)
      if self.cifar_stem:
        block_options["shortcut"] = "pad"
      if self.block is Bottleneck:
        block_options.update(groups=self.groups, base_width=self.width_per_group)
      for i, num_blocks in enumerate(self.stage_sizes):
        name = f"stage{i + 1}"
        if not runs_stage(self, name):
          continue
        x = ResNetStage(block=self.block, num_blocks=num_blocks,
                        filters=base * 2**i, strides=1 if i == 0 else 2,
                        block_options=block_options, name=name)(x, train)
        layers.sow_feature(self, name, x)
        if name == self.last_stage:
          break
    return classifier_head(self, layers.global_avg_pool(x))


class Stem(nn.Module):
  """7x7/2 conv, BN, ReLU, 3x3/2 max pool; or the CIFAR 3x3 conv, BN, ReLU."""
  cifar: bool
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.cifar:
      x = self.conv(16, (3, 3), padding=layers.symmetric_padding(1), name="conv")(x)
      return nn.relu(self.norm(name="bn")(x, train))
    x = self.conv(64, (7, 7), (2, 2), padding=layers.symmetric_padding(3),
                  name="conv")(x)
    x = nn.relu(self.norm(name="bn")(x, train))
    return nn.max_pool(x, (3, 3), (2, 2), padding=layers.symmetric_padding(1))


# torchvision
resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
resnet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
resnet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block=Bottleneck)
resnet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block=Bottleneck)
wide_resnet50_2 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3),
                                    block=Bottleneck, width_per_group=128)
resnext50_32x4d = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3),
                                    block=Bottleneck, groups=32, width_per_group=4)


def cifar_resnet(depth: int) -> Callable[..., ResNet]:
  """CIFAR ResNet of depth 6n+2: three stages of n basic blocks, 10 classes."""
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}.")
  n = (depth - 2) // 6
  return functools.partial(ResNet, stage_sizes=(n, n, n), block=BasicBlock,
                           cifar_stem=True, num_classes=10)
