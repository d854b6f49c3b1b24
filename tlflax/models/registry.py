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

import ast
import dataclasses
import difflib
import importlib
import numbers
from typing import Any, Callable, Mapping

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
    "efficientnet_lite",
    "inception",
    "xception",
    "vit",
)
for _family in FAMILIES:
  _MODELS.update(importlib.import_module(f"tlflax.models.{_family}").MODELS)


def family_of(model: nn.Module) -> str | None:
  """The entry of `FAMILIES` whose module built `model`, or None (the first families).

  Examples:
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

  Examples:
    >>> register("resnet26", functools.partial(resnet.ResNet, stage_sizes=(2, 3, 4, 3),
    ...                                        block=resnet.Bottleneck))
  """
  _MODELS[name] = constructor


def model_names() -> list[str]:
  """The registered model names, sorted.

  Examples:
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
      truncate or `frozen_batchnorm=(".*",)`; `option_names(name)` lists
      them. One the module does not have raises ModelOptionError (a
      ValueError) naming them and the nearest.

  Returns:
    A `Backbone` (a linen module); `model.apply(variables, images, train=False)` takes NHWC
    float32 images and returns logits (or features without a head).

  Examples:
    >>> model = get_model("resnet18", num_classes=2)
  """
  if name not in _MODELS:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(model_names())}.")
  check_options(name, options)
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


# ----------------------------------------------------------------------------
# Model options: the fields of a model's module, set by name
# ----------------------------------------------------------------------------

class ModelOptionError(ValueError):
  """A model option the model does not have, of the wrong type, or unreadable."""


# flax's own dataclass fields of every module, which no user sets.
_INTERNAL_FIELDS = ("parent", "name")
# Field types whose values are checked (annotations are strings under
# `from __future__ import annotations`, classes otherwise).
_FIELD_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _option_fields(name: str) -> dict[str, Any]:
  """The settable fields of `name`'s module, by name -> their type annotation."""
  module = _MODELS[name]()
  if not dataclasses.is_dataclass(module):  # a registered constructor of another kind
    return {}
  return {field.name: field.type for field in dataclasses.fields(module)
          if field.name not in _INTERNAL_FIELDS}


def option_names(name: str) -> list[str]:
  """The options `get_model(name, ...)` takes: the fields of its module, sorted.

  Examples:
    >>> "transform_input" in option_names("inception_v3")
    True
  """
  if name not in _MODELS:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(model_names())}.")
  return sorted(_option_fields(name))


def check_options(name: str, options: Mapping[str, Any], where: str = "") -> None:
  """Raises ModelOptionError if `options` names no field of `name`'s model or has a wrong type.

  Args:
    name: a registered model name.
    options: option name -> value.
    where: what set them, to start the message with (e.g. "--model_option: ").

  Raises:
    ModelOptionError: one line naming the option, the nearest known one and
      all of the model's options; or the option, its value and the type wanted.

  Examples:
    >>> check_options("inception_v3", {"transform_inputs": False})
    ModelOptionError: inception_v3 has no option 'transform_inputs'; did you mean
    transform_input? Its options: ...
  """
  fields = _option_fields(name) if options else {}
  if not fields:
    return
  for key, value in options.items():
    if key not in fields:
      near = difflib.get_close_matches(key, list(fields), n=1)
      hint = f"; did you mean {near[0]}?" if near else "."
      raise ModelOptionError(f"{where}{name} has no option {key!r}{hint} Its options: "
                             f"{', '.join(sorted(fields))}.")
    type_name = getattr(fields[key], "__name__", fields[key])
    wanted = _FIELD_TYPES.get(type_name)
    # bool is an int in Python, but True for a size or a rate is a mistake.
    if wanted and (not isinstance(value, wanted)
                   or (isinstance(value, bool) and bool not in wanted)):
      allowed = "True or False" if bool in wanted else f"a value of type {type_name}"
      raise ModelOptionError(f"{where}{name}'s option {key} takes {allowed}, not {value!r}.")


def parse_model_options(text: str, where: str = "") -> dict[str, Any]:
  """`"transform_input=False, dropout_rate=0.2"` -> `{"transform_input": False, "dropout_rate": 0.2}`.

  The text is what goes between the brackets of a Python call with keyword
  arguments: each value is a Python literal (`False`, `0.2`, `'stage3'`,
  `('.*',)`); a bare word (`last_stage=stage3`) is read as that string, so
  the command line needs no quotes. An empty text gives `{}`. This one
  format is `config.model.options` and each `--model_option`.

  Raises:
    ModelOptionError: text that is not `KEY=VALUE, ...` (saying so, with
      `where` in front).

  Examples:
    >>> parse_model_options("transform_input=False")
    {'transform_input': False}
  """
  text = (text or "").strip().rstrip(",")
  if not text:
    return {}
  usage = (f"{where}{text!r} is not KEY=VALUE[, KEY=VALUE...] with Python literal values "
           "(e.g. transform_input=False, dropout_rate=0.2)")
  try:
    call = ast.parse(f"options({text})", mode="eval").body
  except SyntaxError as e:
    raise ModelOptionError(f"{usage} ({e.msg}).") from None
  if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
    raise ModelOptionError(f"{usage}.")
  options = {}
  for keyword in call.keywords:
    if isinstance(keyword.value, ast.Name):  # a bare word: the string itself
      options[keyword.arg] = keyword.value.id
      continue
    try:
      options[keyword.arg] = ast.literal_eval(keyword.value)
    except ValueError:
      raise ModelOptionError(f"{usage}: the value of {keyword.arg} is "
                             f"{ast.unparse(keyword.value)!r}.") from None
  return options


def merge_model_options(texts, where: str = "") -> dict[str, Any]:
  """Several `parse_model_options` texts as one dict; a later text's value wins.

  Examples:
    >>> merge_model_options(["transform_input=True", "transform_input=False, dropout_rate=0"])
    {'transform_input': False, 'dropout_rate': 0}
  """
  options = {}
  for text in texts:
    options.update(parse_model_options(text, where))
  return options


def format_model_options(options: Mapping[str, Any]) -> str:
  """The inverse of `parse_model_options`: `{"transform_input": False}` -> "transform_input=False"."""
  return ", ".join(f"{key}={value!r}" for key, value in options.items())
