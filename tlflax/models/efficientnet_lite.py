"""EfficientNet-Lite0 ... Lite4, Google's EfficientNet for integer accelerators.

Lite is EfficientNet-B0's block table (`tlflax.models.efficientnet`) with
four changes, as Google's `efficientnet_lite_builder.py` makes them and the
`efficientnet-lite-pytorch` package and timm's `tf_efficientnet_lite*`
repeat them:

* no squeeze-excitation (`squeeze_excite=False`);
* ReLU6 in place of SiLU, after the stem, in every block and after the top
  convolution (`activation="relu6"`);
* the stem (32 channels) and the top convolution (1280) keep their widths at
  every size, and the first and last stages keep one block each: only the
  other stages' widths and block counts scale;
* convolutions pad as TensorFlow's "SAME": symmetric at stride 1 and, at
  stride 2, one pixel less before than after on an even side. For the odd
  kernels here that is exactly Keras' `correct_pad` (`padding="keras"`).

BatchNorm is TensorFlow's: eps 1e-3, momentum 0.99. The stages and
parameter paths are EfficientNet's (`stem`, `stage1` ... `stage7`, `top`,
`head`; blocks without `se/`), so freezing rules written for one apply to
the other. The weights (and the input size each was trained at) are in
`tlflax.weights.efficientnet_lite`.
"""

from __future__ import annotations

import functools

from tlflax.models.efficientnet import KERAS_PADDING, EfficientNet, scaled_b0_stages

# (width, depth, dropout) of Lite0-Lite4, from Google's efficientnet_lite_params;
# its input sizes (224, 240, 260, 280, 300) belong to the weights.
LITE_SCALING = {
    "lite0": (1.0, 1.0, 0.2), "lite1": (1.0, 1.1, 0.2), "lite2": (1.1, 1.2, 0.3),
    "lite3": (1.2, 1.4, 0.3), "lite4": (1.4, 1.8, 0.3),
}
STEM_CHANNELS = 32
TOP_CHANNELS = 1280


class EfficientNetLite(EfficientNet):
  """An EfficientNet-Lite backbone: `EfficientNet` with Lite's settings as defaults.

  A class of its own (not only a set of options) so that the registry finds
  its weight converters (`tlflax.weights.efficientnet_lite`). Every option of
  `EfficientNet` applies.

  Examples:
    >>> model = get_model("efficientnet_lite0", num_classes=2)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  """
  padding: str = KERAS_PADDING
  bn_epsilon: float = 1e-3
  bn_momentum: float = 0.99
  activation: str = "relu6"
  squeeze_excite: bool = False


def lite_stages(width: float, depth: float):
  """B0's stages scaled by `width` and `depth`, with Lite's fixed ends.

  The first stage takes the fixed 32-channel stem; it and the last stage keep
  B0's single block (Google's `fix_head_stem`).

  Examples:
    >>> [s.num_blocks for s in lite_stages(1.4, 1.8)]
    [1, 4, 4, 6, 6, 8, 1]
  """
  stages = list(scaled_b0_stages(width, depth))
  unscaled = scaled_b0_stages(1.0, 1.0)
  stages[0] = stages[0]._replace(in_channels=STEM_CHANNELS, num_blocks=unscaled[0].num_blocks)
  stages[-1] = stages[-1]._replace(num_blocks=unscaled[-1].num_blocks)
  return tuple(stages)


def _lite_variant(variant: str):
  width, depth, dropout = LITE_SCALING[variant]
  return functools.partial(EfficientNetLite, stages=lite_stages(width, depth),
                           top_channels=TOP_CHANNELS, dropout_rate=dropout)


MODELS = {f"efficientnet_{variant}": _lite_variant(variant) for variant in LITE_SCALING}
