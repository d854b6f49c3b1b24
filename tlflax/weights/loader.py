"""`load(model_name, path, source)`: any source's weight file -> tlflax variables."""

from __future__ import annotations

import importlib
import os
from typing import Any

from tlflax import models
from tlflax.tree import unflatten
from tlflax.weights import download, registry
from tlflax.weights.merge import WeightsError, check_fits

SOURCES = ("torchvision", "timm", "keras", "tlflax")

def convert_to_flat(model_name: str, path: str, source: str) -> dict[str, Any]:
  """Reads a file of `source` and returns flat `{"params/...": array}` in our names.

  The first families (ResNets, VGGs) have a name table in each source's
  module; every later family (`tlflax.models.registry.FAMILIES`) keeps its
  tables, one per source, in `tlflax/weights/<family>.py`, whose
  `convert(model_name, path, source)` is called instead. tlflax checkpoints
  are read the same way for every family.
  """
  family = models.registry.family_of(models.get_model(model_name))
  if family is not None and source != "tlflax":
    if source not in SOURCES:
      raise WeightsError(f"Unknown weight source {source!r}; use one of {', '.join(SOURCES)}.")
    return importlib.import_module(f"tlflax.weights.{family}").convert(model_name, path, source)
  if source == "torchvision":
    from tlflax.weights import torchvision as reader  # pylint: disable=import-outside-toplevel
  elif source == "timm":
    from tlflax.weights import timm as reader  # pylint: disable=import-outside-toplevel
  elif source == "keras":
    from tlflax.weights import keras as reader  # pylint: disable=import-outside-toplevel
  elif source == "tlflax":
    from tlflax.weights import native as reader  # pylint: disable=import-outside-toplevel
  else:
    raise WeightsError(f"Unknown weight source {source!r}; use one of {', '.join(SOURCES)}.")
  return reader.convert(model_name, path)


def load(model_name: str, path: str | os.PathLike, source: str | None = None,
         **model_options) -> dict[str, Any]:
  """Loads pretrained weights for a registered model.

  Args:
    model_name: a name from `tlflax.models.model_names()`.
    path: a weight file (or a tlflax checkpoint directory), or the id of a
      known pretrained weight (see `tlflax.weights.registry`), which is
      downloaded into the cache and verified first.
    source: "torchvision", "timm", "keras" or "tlflax"; may be left out for a
      registry id, whose entry names its source.
    **model_options: options of the model the weights must fit. A VGG file
      without its dense layers (Keras `include_top=False`) is read as
      `last_stage="stage5"`. A ViT takes `image_size=`: its position
      embeddings are resampled to that size's patch grid (without it, the
      model is built for the size the file was trained at).

  Returns:
    `{"params": ..., "batch_stats": ...}` shaped exactly like `model.init` of
    `get_model(model_name, num_classes=<the file's number of classes>)`.

  Raises:
    WeightsError: unreadable file, unknown source, or weights of another
      architecture (naming the keys and shapes that do not fit).
  """
  if model_name not in models.model_names():
    raise WeightsError(f"Unknown model {model_name!r}. Known models: "
                       f"{', '.join(models.model_names())}.")
  path = os.fspath(path)
  if not os.path.exists(path):
    if registry.is_known(path):
      entry = registry.get(path)
      if entry.model_name != model_name:
        raise WeightsError(f"{path!r} holds weights for {entry.model_name!r}, not "
                           f"{model_name!r}; pick an id of {model_name!r} "
                           f"(tlflax.weights.registry.list_ids()).")
      if source not in (None, entry.source):
        raise WeightsError(f"{path!r} is {entry.source} weights, not {source}.")
      source, path = entry.source, download.fetch(path)
  if source is None:
    raise WeightsError(f"Say which framework {path!r} comes from: source= one of "
                       f"{', '.join(SOURCES)}.")
  if source not in SOURCES:
    raise WeightsError(f"Unknown weight source {source!r}; use one of {', '.join(SOURCES)}.")
  flat = convert_to_flat(model_name, path, source)
  # A family may fit the weights to the model options (a ViT's position
  # embeddings resampled to `image_size`, or `image_size` read from them).
  family = models.registry.family_of(models.get_model(model_name))
  fit_weights = family and getattr(importlib.import_module(f"tlflax.weights.{family}"),
                                   "fit_weights", None)
  if fit_weights:
    flat, model_options = fit_weights(model_name, flat, model_options)
  head = flat.get("params/head/kernel")
  if head is None and "fc" in models.get_model(model_name).stage_names:
    if not any(k.startswith("params/fc/") for k in flat):
      # A VGG saved without its top (Keras include_top=False) also lacks the
      # hidden dense layers: it is the convolution stages alone.
      model_options.setdefault("last_stage", "stage5")
  model = models.get_model(model_name, num_classes=None if head is None else head.shape[-1],
                           **model_options)
  check_fits(flat, model, f"model {model_name!r} (from {source} file {path!r})")
  return unflatten(flat)
