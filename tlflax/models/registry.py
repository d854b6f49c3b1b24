"""Model names -> constructors.

The first families (torchvision and CIFAR ResNets, VGGs, the Keras ResNets
and VGGs) are listed here directly. Every later family lives in modules of
its own, named in `FAMILIES`: `tlflax/models/<family>.py` builds it and
lists its names in `MODELS`, and `tlflax/weights/<family>.py` converts its
weights (one name table per source) and lists its published files in
`PRETRAINED`. `register` adds constructors from outside the package.
Whatever is registered must build a `base.Backbone`.
"""

from __future__ import annotations

import importlib
import numbers
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from tlflax.models import keras_resnet, resnet, vgg
from tlflax.models.base import Backbone

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "wide_resnet50_2": resnet.wide_resnet50_2,
    "resnext50_32x4d": resnet.resnext50_32x4d,
    **{f"cifar_resnet{d}": resnet.cifar_resnet(d) for d in (20, 32, 44, 56, 110)},
    **{f"vgg{d}": vgg.vgg(d) for d in (11, 13, 16, 19)},
    **{f"vgg{d}_bn": vgg.vgg(d, batch_norm=True) for d in (11, 13, 16, 19)},
    "keras_vgg16": vgg.keras_vgg16,
    "keras_vgg19": vgg.keras_vgg19,
    "keras_resnet50": keras_resnet.keras_resnet50,
    "keras_resnet101": keras_resnet.keras_resnet101,
    "keras_resnet152": keras_resnet.keras_resnet152,
    "keras_resnet50v2": keras_resnet.keras_resnet50v2,
    "keras_resnet101v2": keras_resnet.keras_resnet101v2,
    "keras_resnet152v2": keras_resnet.keras_resnet152v2,
}

# Families in modules of their own (see the module docstring), one per line.
FAMILIES = (
    "alexnet",
    "convnext",
    "efficientnet",
    "inception",
    "xception",
    "vit",
)
for _family in FAMILIES:
  _MODELS.update(importlib.import_module(f"tlflax.models.{_family}").MODELS)


def family_of(model: nn.Module) -> str | None:
  """The entry of `FAMILIES` whose module built `model`, or None (the first families).

  Example:
    >>> family_of(get_model("alexnet"))
    'alexnet'
  """
  module = type(model).__module__
  prefix, _, family = module.rpartition(".")
  return family if prefix == "tlflax.models" and family in FAMILIES else None


def register(name: str, constructor: Callable[..., nn.Module]) -> None:
  """Adds a model constructor under `name`, replacing any constructor of that name.

  The built-in families are listed in this module directly; `register` is for
  models defined elsewhere (a notebook, an experiment).

  Args:
    name: what `get_model` and `config.model.name` will call it.
    constructor: called as `constructor(dtype=..., **options)`; it must build a
      `base.Backbone` (named stages, `last_stage`, `input_stage`,
      `num_classes`, `frozen_batchnorm`, `dtype`).

  Example:
    >>> register("resnet26", functools.partial(resnet.ResNet, stage_sizes=(2, 3, 4, 3),
    ...                                        block=resnet.Bottleneck))
  """
  _MODELS[name] = constructor


def model_names() -> list[str]:
  """The registered model names, sorted.

  Example:
    >>> "resnet50" in model_names()
    True
  """
  return sorted(_MODELS)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The registry's "leave it at the constructor's default" marker for num_classes.
_DEFAULT = object()


def get_model(name: str, num_classes: Any = _DEFAULT, dtype: Any = "float32",
              **options) -> Backbone:
  """Builds a registered backbone.

  Args:
    name: e.g. "resnet50", "vgg16_bn", "keras_resnet50", "cifar_resnet56".
    num_classes: size of the new `head`; `None` for no head (features only).
      Defaults to the original model's (1000 for ImageNet, 10 for CIFAR).
    dtype: computation dtype, "float32" or "bfloat16" (parameters stay float32).
    **options: other fields of the module, e.g. `last_stage="stage3"` to
      truncate or `frozen_batchnorm=(".*",)`.

  Returns:
    A `Backbone` (a linen module); `model.apply(variables, images, train=False)` takes NHWC
    float32 images and returns logits (or features without a head).

  Example:
    >>> model = get_model("resnet18", num_classes=2)
  """
  if name not in _MODELS:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(model_names())}.")
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
    dtype = _DTYPES[dtype]
  if num_classes is not _DEFAULT:
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(
        num_classes, numbers.Integral) or num_classes < 1):
      raise ValueError(f"num_classes={num_classes!r}: a head needs at least one class (an "
                       "int >= 1); use num_classes=None for a network without a head.")
    options["num_classes"] = None if num_classes is None else int(num_classes)
  return _MODELS[name](dtype=dtype, **options)
