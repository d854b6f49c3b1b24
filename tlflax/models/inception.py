"""Inception-v3 (Szegedy et al. 2016) as torchvision and keras.applications build it.

The two publishers build the same network, layer for layer and in the same
order, and differ in three details that change the numbers:

* torchvision's BatchNorms have a scale (gamma); Keras' `conv2d_bn` has none
  (`scale=False`), so `keras_inception_v3` builds them without one.
* The 3x3 average pools of the branch_pool branches: torchvision's
  `avg_pool2d(padding=1)` divides by 9 at the border too (the zero padding
  counts), Keras' `AveragePooling2D(padding="same")` divides by the number of
  real pixels (`pool_counts_padding`).
* torchvision's `transform_input` (see `InceptionV3.transform_input`) and its
  dropout before the classifier; Keras has neither.

BatchNorm epsilon is 1e-3 in both. Every convolution is unpadded ("valid")
or padded to keep the size at stride 1 (PyTorch's `padding=k // 2`, Keras'
"same", the same thing for odd kernels at stride 1), so no TF-style
asymmetric padding is needed.

Stages follow the paper's grid sizes, as the publishers' own names group the
blocks (torchvision `Mixed_5b`..., Keras `mixed0`...):

    stem     Conv2d_1a .. Conv2d_4a and both max pools    (299 px: 35x35x192)
    stage1   Mixed_5b, Mixed_5c, Mixed_5d (Keras mixed0-2) (35x35x288)
    stage2   Mixed_6a .. Mixed_6e (Keras mixed3-7)         (17x17x768)
    stage3   Mixed_7a, Mixed_7b, Mixed_7c (Keras mixed8-10) (8x8x2048)

Parameter paths: `stem/<conv>/{conv,bn}` and
`stage{i}/mixed_<id>/<branch conv>/{conv,bn}`, with torchvision's names
lowercased (`stage1/mixed_5b/branch5x5_1/conv`), then `head`.

The auxiliary classifier torchvision attaches to Mixed_6e (`AuxLogits`,
3.3M parameters) only adds a second loss in training and is not built; its
tensors in a torchvision file are reported and left out by the converter
(`tlflax.weights.inception`). The parameter count therefore equals
torchvision's `inception_v3(aux_logits=False)`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp

from tlflax.models import layers
from tlflax.models.base import (ModuleDef, check_stages, classifier_head, numbered_stages,
                                runs_stage)

BN_EPSILON = 1e-3
# torchvision keeps PyTorch's momentum 0.1 (flax 0.9); Keras its 0.99.
TORCH_BN_MOMENTUM = 0.9
KERAS_BN_MOMENTUM = 0.99

# torchvision's transform_input: the ImageNet mean and std it undoes.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvSpec(NamedTuple):
  """One convolution + BatchNorm + ReLU (torchvision `BasicConv2d`, Keras `conv2d_bn`).

  Attributes:
    name: its module name (torchvision's, lowercased).
    features: output channels.
    kernel: (rows, columns).
    strides: 1 or 2.
    same: pad to keep the size (stride 1 only); otherwise unpadded.
  """
  name: str
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  same: bool = True


class Branch(NamedTuple):
  """One branch of an Inception block, concatenated with the others.

  Attributes:
    convs: applied one after another.
    fork: applied side by side to the chain's output and concatenated
      (Mixed_7b/7c split their 3x3 into a 1x3 and a 3x1).
    pool: "avg" (3x3, stride 1, size kept) or "max" (3x3, stride 2,
      unpadded) applied before `convs`; "" for none.
  """
  convs: tuple[ConvSpec, ...]
  fork: tuple[ConvSpec, ...] = ()
  pool: str = ""


def _block_a(pool_features):  # Mixed_5b/c/d (torchvision InceptionA)
  return (Branch((ConvSpec("branch1x1", 64),)),
          Branch((ConvSpec("branch5x5_1", 48), ConvSpec("branch5x5_2", 64, (5, 5)))),
          Branch((ConvSpec("branch3x3dbl_1", 64), ConvSpec("branch3x3dbl_2", 96, (3, 3)),
                  ConvSpec("branch3x3dbl_3", 96, (3, 3)))),
          Branch((ConvSpec("branch_pool", pool_features),), pool="avg"))


_BLOCK_B = (  # Mixed_6a (InceptionB): 35 -> 17
    Branch((ConvSpec("branch3x3", 384, (3, 3), 2, False),)),
    Branch((ConvSpec("branch3x3dbl_1", 64), ConvSpec("branch3x3dbl_2", 96, (3, 3)),
            ConvSpec("branch3x3dbl_3", 96, (3, 3), 2, False))),
    Branch((), pool="max"))


def _block_c(c7):  # Mixed_6b-e (InceptionC): factorised 7x7 convolutions
  return (Branch((ConvSpec("branch1x1", 192),)),
          Branch((ConvSpec("branch7x7_1", c7), ConvSpec("branch7x7_2", c7, (1, 7)),
                  ConvSpec("branch7x7_3", 192, (7, 1)))),
          Branch((ConvSpec("branch7x7dbl_1", c7), ConvSpec("branch7x7dbl_2", c7, (7, 1)),
                  ConvSpec("branch7x7dbl_3", c7, (1, 7)), ConvSpec("branch7x7dbl_4", c7, (7, 1)),
                  ConvSpec("branch7x7dbl_5", 192, (1, 7)))),
          Branch((ConvSpec("branch_pool", 192),), pool="avg"))


_BLOCK_D = (  # Mixed_7a (InceptionD): 17 -> 8
    Branch((ConvSpec("branch3x3_1", 192), ConvSpec("branch3x3_2", 320, (3, 3), 2, False))),
    Branch((ConvSpec("branch7x7x3_1", 192), ConvSpec("branch7x7x3_2", 192, (1, 7)),
            ConvSpec("branch7x7x3_3", 192, (7, 1)),
            ConvSpec("branch7x7x3_4", 192, (3, 3), 2, False))),
    Branch((), pool="max"))

_BLOCK_E = (  # Mixed_7b/7c (InceptionE): expanded filter banks
    Branch((ConvSpec("branch1x1", 320),)),
    Branch((ConvSpec("branch3x3_1", 384),),
           fork=(ConvSpec("branch3x3_2a", 384, (1, 3)), ConvSpec("branch3x3_2b", 384, (3, 1)))),
    Branch((ConvSpec("branch3x3dbl_1", 448), ConvSpec("branch3x3dbl_2", 384, (3, 3))),
           fork=(ConvSpec("branch3x3dbl_3a", 384, (1, 3)),
                 ConvSpec("branch3x3dbl_3b", 384, (3, 1)))),
    Branch((ConvSpec("branch_pool", 192),), pool="avg"))

# The stem: convolutions, with a 3x3/2 max pool after conv2d_2b and conv2d_4a.
STEM = (ConvSpec("conv2d_1a_3x3", 32, (3, 3), 2, False),
        ConvSpec("conv2d_2a_3x3", 32, (3, 3), 1, False),
        ConvSpec("conv2d_2b_3x3", 64, (3, 3)),
        ConvSpec("conv2d_3b_1x1", 80, (1, 1), 1, False),
        ConvSpec("conv2d_4a_3x3", 192, (3, 3), 1, False))
_POOL_AFTER = ("conv2d_2b_3x3", "conv2d_4a_3x3")

# (stage, ((block name, branches), ...)) in network order.
STAGES = (
    ("stage1", (("mixed_5b", _block_a(32)), ("mixed_5c", _block_a(64)),
                ("mixed_5d", _block_a(64)))),
    ("stage2", (("mixed_6a", _BLOCK_B), ("mixed_6b", _block_c(128)),
                ("mixed_6c", _block_c(160)), ("mixed_6d", _block_c(160)),
                ("mixed_6e", _block_c(192)))),
    ("stage3", (("mixed_7a", _BLOCK_D), ("mixed_7b", _BLOCK_E), ("mixed_7c", _BLOCK_E))),
)


def conv_paths() -> tuple[str, ...]:
  """Every ConvSpec's module path, in the order both publishers create the layers.

  Keras numbers its unnamed layers (conv2d, conv2d_1, ...) in this order, so
  the i-th Keras convolution and BatchNorm belong to the i-th path here.

  Examples:
    >>> conv_paths()[:2]
    ('stem/conv2d_1a_3x3', 'stem/conv2d_2a_3x3')
  """
  paths = [f"stem/{spec.name}" for spec in STEM]
  for stage, blocks in STAGES:
    for block, branches in blocks:
      for branch in branches:
        paths += [f"{stage}/{block}/{spec.name}" for spec in branch.convs + branch.fork]
  return tuple(paths)


class ConvBN(nn.Module):
  """Convolution (no bias), BatchNorm, ReLU."""
  spec: ConvSpec
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = False):
    rows, cols = self.spec.kernel
    padding = (((rows // 2,) * 2, (cols // 2,) * 2) if self.spec.same else "VALID")
    x = self.conv(self.spec.features, self.spec.kernel, (self.spec.strides,) * 2,
                  padding=padding, name="conv")(x)
    return nn.relu(self.norm(name="bn")(x, train))


def average_pool_3x3(x, counts_padding: bool):
  """3x3 stride-1 average pool keeping the size (one pixel of zeros around).

  Args:
    x: NHWC.
    counts_padding: divide by 9 everywhere (PyTorch's default
      `count_include_pad=True`), or by the number of real pixels under the
      window (Keras' "same" pooling).
  """
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=counts_padding)


class InceptionBlock(nn.Module):
  """The branches of one Mixed block, concatenated along the channels."""
  branches: tuple[Branch, ...]
  conv: ModuleDef
  norm: ModuleDef
  pool_counts_padding: bool

  @nn.compact
  def __call__(self, x, train: bool = False):
    outputs = []
    for branch in self.branches:
      y = x
      if branch.pool == "avg":
        y = average_pool_3x3(y, self.pool_counts_padding)
      elif branch.pool == "max":
        y = nn.max_pool(y, (3, 3), (2, 2))
      for spec in branch.convs:
        y = ConvBN(spec, self.conv, self.norm, name=spec.name)(y, train)
      if branch.fork:
        y = jnp.concatenate([ConvBN(spec, self.conv, self.norm, name=spec.name)(y, train)
                             for spec in branch.fork], axis=-1)
      outputs.append(y)
    return jnp.concatenate(outputs, axis=-1)


class InceptionStage(nn.Module):
  """A run of Mixed blocks named as the publishers name them (mixed_5b, ...)."""
  blocks: tuple[tuple[str, tuple[Branch, ...]], ...]
  conv: ModuleDef
  norm: ModuleDef
  pool_counts_padding: bool

  @nn.compact
  def __call__(self, x, train: bool = False):
    for name, branches in self.blocks:
      x = InceptionBlock(branches, self.conv, self.norm, self.pool_counts_padding,
                         name=name)(x, train)
    return x


class Stem(nn.Module):
  """Five convolutions and two 3x3/2 max pools: 299 px -> 35x35x192."""
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = False):
    for spec in STEM:
      x = ConvBN(spec, self.conv, self.norm, name=spec.name)(x, train)
      if spec.name in _POOL_AFTER:
        x = nn.max_pool(x, (3, 3), (2, 2))
    return x


def undo_imagenet_normalisation(x):
  """torchvision's `transform_input`: ImageNet-normalised x -> (pixels - 0.5) / 0.5.

  x * std / 0.5 + (mean - 0.5) / 0.5 per channel, as torchvision computes it.
  """
  scale = jnp.asarray([s / 0.5 for s in IMAGENET_STD], x.dtype)
  shift = jnp.asarray([(m - 0.5) / 0.5 for m in IMAGENET_MEAN], x.dtype)
  return x * scale + shift


class InceptionV3(nn.Module):
  """Inception-v3 backbone with named stages (a `base.Backbone`); see the module doc.

  Attributes:
    num_classes: size of the `head` layer; `None` builds no head and returns
      the pooled 2048 features.
    use_bn_scale: BatchNorm with a learned scale (torchvision) or without
      (Keras' `scale=False`).
    pool_counts_padding: the branch_pool average pools divide by 9 at the
      border too (torchvision) or by the real pixels only (Keras).
    transform_input: torchvision's `transform_input`: the input is
      ImageNet-normalised ((pixels - mean) / std, like every torchvision
      model's) and the stem first maps it back to the (pixels - 0.5) / 0.5
      scaling the Google-trained weights expect. torchvision turns it on
      whenever it loads its pretrained weights, so `inception_v3` has it on
      by default and its registry entry keeps torchvision's ImageNet
      mean/std preprocessing; `inception_v3(transform_input=False)` takes
      images scaled to [-1, 1] directly (the same computation up to
      rounding), as `keras_inception_v3` does.
    dropout_rate: dropout before the head in training (torchvision 0.5).
    last_stage, input_stage, dtype, frozen_batchnorm, head_init: as declared
      by `base.Backbone`.
    bn_momentum: flax momentum of the running statistics.

  Examples:
    >>> model = inception_v3(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
    >>> logits = model.apply(variables, images, train=False)
  """
  num_classes: Optional[int] = 1000
  use_bn_scale: bool = True
  pool_counts_padding: bool = True
  transform_input: bool = False
  dropout_rate: float = 0.5
  last_stage: Optional[str] = None
  input_stage: Optional[str] = None
  dtype: Any = jnp.float32
  frozen_batchnorm: tuple[str, ...] = ()
  head_init: str = "lecun"
  bn_momentum: float = TORCH_BN_MOMENTUM

  # The smallest input the unpadded convolutions allow (Mixed_7a then sees
  # 3x3); `tlflax.weights.merge.model_shapes` traces the model at this size.
  min_input_size = 75

  @property
  def stage_names(self) -> tuple[str, ...]:
    """Stages from input to output, without the head."""
    return ("stem",) + numbered_stages(len(STAGES))

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(layers.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(layers.BatchNorm, momentum=self.bn_momentum,
                             epsilon=BN_EPSILON, use_scale=self.use_bn_scale,
                             dtype=self.dtype, frozen_patterns=self.frozen_batchnorm)
    check_stages(self)
    x = x.astype(self.dtype)
    if runs_stage(self, "stem"):
      if self.transform_input:
        x = undo_imagenet_normalisation(x)
      x = Stem(conv, norm, name="stem")(x, train)
      layers.sow_feature(self, "stem", x)
    if self.last_stage != "stem":
      for name, blocks in STAGES:
        if not runs_stage(self, name):
          continue
        x = InceptionStage(blocks, conv, norm, self.pool_counts_padding, name=name)(x, train)
        layers.sow_feature(self, name, x)
        if name == self.last_stage:
          break
    pooled = layers.global_avg_pool(x)
    if self.dropout_rate and self.num_classes is not None:
      pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
    return classifier_head(self, pooled)


# torchvision `inception_v3`, as torchvision builds it for its pretrained weights.
inception_v3 = functools.partial(InceptionV3, transform_input=True)
# keras.applications `InceptionV3`.
keras_inception_v3 = functools.partial(
    InceptionV3, use_bn_scale=False, pool_counts_padding=False, dropout_rate=0.0,
    bn_momentum=KERAS_BN_MOMENTUM)

MODELS = {"inception_v3": inception_v3, "keras_inception_v3": keras_inception_v3}
