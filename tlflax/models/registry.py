"""Model names -> constructors, and reading stage outputs from any model."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.models import keras_resnet, layers, resnet, vgg

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


def register(name: str, constructor: Callable[..., nn.Module]) -> None:
  """Adds a model constructor under `name` (used by the Keras family too)."""
  _MODELS[name] = constructor


def model_names() -> list[str]:
  return sorted(_MODELS)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The registry's "leave it at the constructor's default" marker for num_classes.
_DEFAULT = object()


def get_model(name: str, num_classes: Any = _DEFAULT, dtype: Any = "float32",
              **options) -> nn.Module:
  """Builds a registered backbone.

  Args:
    name: e.g. "resnet50", "vgg16_bn", "keras_resnet50", "cifar_resnet56".
    num_classes: size of the new `head`; `None` for no head (features only).
      Defaults to the original model's (1000 for ImageNet, 10 for CIFAR).
    dtype: computation dtype, "float32" or "bfloat16" (parameters stay float32).
    **options: other fields of the module, e.g. `last_stage="stage3"` to
      truncate or `frozen_batchnorm=(".*",)`.

  Returns:
    A linen module; `model.apply(variables, images, train=False)` takes NHWC
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
    options["num_classes"] = num_classes
  return _MODELS[name](dtype=dtype, **options)


def extract_features(model: nn.Module, variables, images,
                     names: Optional[Iterable[str]] = None) -> dict[str, jax.Array]:
  """Runs `model` in inference mode and returns the requested stage outputs.

  Args:
    model: a backbone from `get_model`.
    variables: its `{"params", "batch_stats"}`.
    images: NHWC batch.
    names: stage names (e.g. "stage2") and/or "pre_logits"; all by default.

  Returns:
    `{name: array}`, plus "logits" when the model has a head.
  """
  logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  captured = dict(state["intermediates"]["features"])
  if getattr(model, "num_classes", None) is not None:
    captured["logits"] = logits
  if names is None:
    return captured
  names = list(names)
  missing = [n for n in names if n not in captured]
  if missing:
    raise ValueError(f"{missing} not produced by this model; available: {sorted(captured)}.")
  return {n: captured[n] for n in names}


PRE_LOGITS = layers.PRE_LOGITS
