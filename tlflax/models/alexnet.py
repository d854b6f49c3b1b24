"""AlexNet as torchvision builds it (the "one weird trick" variant, 61.1M parameters).

Krizhevsky's network has five convolutions and three dense layers; the
convolutions fall into three groups separated by the max pools, and those
groups are the stages here (there is no stem, as in VGG):

    stage1   conv1 11x11/4 (64), max pool 3/2
    stage2   conv2 5x5 (192), max pool 3/2
    stage3   conv3 3x3 (384), conv4 3x3 (256), conv5 3x3 (256), max pool 3/2
    fc       fc/dense1, fc/dense2: the two 4096-wide hidden layers
    head

Parameter paths: `stage{i}/conv{j}` (convolutions numbered 1-5 through the
network, as in the paper), `fc/dense1`, `fc/dense2`, `head`.

The last map is average-pooled to 6x6 (PyTorch's adaptive pool) and
flattened in NHWC order; the converter permutes the rows of torchvision's
first dense layer, which sees NCHW order (`tlflax.weights.alexnet`). Dropout
sits *before* each hidden dense layer, where torchvision puts it. Inputs must
be at least 63 px (torchvision's `min_size`): smaller ones vanish in the pools.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from tlflax.models import layers
from tlflax.models.base import check_stages, classifier_head, numbered_stages, runs_stage

# (output channels, kernel size, stride, padding) of each convolution, grouped by stage.
ALEXNET_STAGES = (
    ((64, 11, 4, 2),),
    ((192, 5, 1, 2),),
    ((384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)),
)


class AlexNet(nn.Module):
  """AlexNet with named stages (a `base.Backbone`).

  Attributes:
    num_classes: size of the `head` layer; `None` builds no head.
    hidden_size: width of `fc/dense1` and `fc/dense2`.
    dropout_rate: dropout before each hidden layer in training (torchvision 0.5);
      it draws from the "dropout" rng the train step passes.
    last_stage: truncate after this stage; a convolution stage is then
      globally average-pooled before the head.
    input_stage: the input is this stage's output; see `base.runs_stage`.
    dtype, frozen_batchnorm, head_init: as declared by `base.Backbone`
      (AlexNet has no BatchNorm, so `frozen_batchnorm` changes nothing).

  Examples:
    >>> model = alexnet(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    >>> logits = model.apply(variables, images, train=False)
  """
  num_classes: Optional[int] = 1000
  hidden_size: int = 4096
  dropout_rate: float = 0.5
  last_stage: Optional[str] = None
  input_stage: Optional[str] = None
  dtype: Any = jnp.float32
  frozen_batchnorm: tuple[str, ...] = ()
  head_init: str = "lecun"
  # Smallest input the pools leave a pixel of (what `model_shapes` traces at).
  min_input_size = 63

  @property
  def stage_names(self) -> tuple[str, ...]:
    """The three convolution stages, then `fc` (the hidden dense layers)."""
    return numbered_stages(len(ALEXNET_STAGES)) + ("fc",)

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_stages(self)
    x = x.astype(self.dtype)
    conv_number = 1
    for i, convolutions in enumerate(ALEXNET_STAGES):
      name = f"stage{i + 1}"
      if runs_stage(self, name):
        x = AlexNetStage(convolutions=convolutions, first_conv_number=conv_number,
                         dtype=self.dtype, name=name)(x)
        layers.sow_feature(self, name, x)
        if name == self.last_stage:
          return classifier_head(self, layers.global_avg_pool(x))
      conv_number += len(convolutions)
    if runs_stage(self, "fc"):
      x = layers.adaptive_avg_pool(x, (6, 6)).reshape(x.shape[0], -1)
      x = HiddenLayers(hidden_size=self.hidden_size, dropout_rate=self.dropout_rate,
                       dtype=self.dtype, name="fc")(x, train)
      layers.sow_feature(self, "fc", x)
    return classifier_head(self, x)


class AlexNetStage(nn.Module):
  """Convolutions with ReLU, then a 3x3 max pool of stride 2."""
  convolutions: tuple[tuple[int, int, int, int], ...]
  first_conv_number: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j, (features, kernel, stride, padding) in enumerate(self.convolutions):
      x = layers.Conv(features, (kernel, kernel), (stride, stride),
                      padding=layers.symmetric_padding(padding), dtype=self.dtype,
                      name=f"conv{self.first_conv_number + j}")(x)
      x = nn.relu(x)
    if min(x.shape[1:3]) < 3:
      raise ValueError(f"AlexNet needs inputs of at least {AlexNet.min_input_size} px: "
                       f"a {x.shape[1]}x{x.shape[2]} map is left before a 3x3 pool; "
                       "resize the images up.")
    return nn.max_pool(x, (3, 3), (2, 2))


class HiddenLayers(nn.Module):
  """Dropout, dense, ReLU, twice: torchvision's classifier without its last layer."""
  hidden_size: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for name in ("dense1", "dense2"):
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.relu(nn.Dense(self.hidden_size, dtype=self.dtype, name=name)(x))
    return x


alexnet = functools.partial(AlexNet)

MODELS = {"alexnet": alexnet}
