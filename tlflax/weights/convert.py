"""Converting pretrained weights once into a tlflax checkpoint with its provenance.

`convert` loads weights of any source (a file, or a known id downloaded and
verified first) and saves them as a tlflax checkpoint that records where they
came from and how images must be prepared for them, so classifying with it
needs nothing else. The command line is `python -m tlflax.cli.convert`.

A weight file holds tensors, not every setting of the network that made
them: torchvision's `inception_v3` may have been trained with or without
`transform_input`, and the file looks the same. Such options are given to
`convert` (`model_options=`, `--model_option KEY=VALUE`) and recorded in the
checkpoint, so every later use builds the same network. Where a family
assumes a value the file cannot confirm, it declares it beside its weights
table (`ASSUMED_OPTIONS` in `tlflax/weights/<family>.py`) and `convert`
logs the assumption.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from typing import Any, Mapping

import numpy as np

from tlflax import models
from tlflax.tree import flatten
from tlflax.weights import download, loader, native, registry
from tlflax.weights.merge import WeightsError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Conversion:
  """What `convert` wrote."""
  output: str
  provenance: dict
  num_parameters: int

  def __str__(self):
    classes = self.provenance.get("num_classes")
    options = self.provenance.get("model_options")
    return (f"Wrote {self.provenance['model_name']} ({self.provenance['source']} "
            f"{self.provenance['input_file']}) to {self.output}: {self.num_parameters:,} "
            f"parameters, " + (f"{classes} classes." if classes else "no classifier head.")
            + (f" Model options: {models.registry.format_model_options(options)}."
               if options else ""))


def resolve_input(input_name: str, source: str | None) -> tuple[str, str, registry.PretrainedWeights | None]:
  """A file or pretrained id -> (local path, source, registry entry or None).

  Raises:
    WeightsError: a missing file that is no known id either, or a source
      that contradicts the id's.

  Examples:
    >>> resolve_input("resnet18.tv_in1k", None)[1]
    'torchvision'
  """
  if os.path.exists(input_name):
    if source is None:
      raise WeightsError(f"Say which framework {input_name!r} comes from with --source "
                         f"(one of {', '.join(loader.SOURCES)}).")
    return input_name, source, None
  if not registry.is_known(input_name):
    raise WeightsError(f"{input_name!r} is neither an existing file nor a known pretrained "
                       "id (tlflax.weights.registry.list_ids() lists them).")
  entry = registry.get(input_name)
  if source not in (None, entry.source):
    raise WeightsError(f"{input_name!r} is {entry.source} weights, not {source}.")
  return download.fetch(input_name), entry.source, entry


def assumed_options(model_name: str, model_options: Mapping[str, Any] | None = None
                    ) -> dict[str, tuple[Any, str]]:
  """The options of `model_name` its weight files cannot carry and `model_options` leaves unset.

  Each family declares them beside its weights table, as `ASSUMED_OPTIONS`
  in `tlflax/weights/<family>.py`: `{model name: {option: (why that value,
  what to pass instead)}}`; the value assumed is the model's default.

  Returns:
    option -> (the value assumed, the sentence saying why and what to pass
    instead), for the log.

  Examples:
    >>> assumed_options("inception_v3")["transform_input"][0]
    True
  """
  model = models.get_model(model_name)
  family = models.registry.family_of(model)
  if family is None:
    return {}
  declared = getattr(importlib.import_module(f"tlflax.weights.{family}"), "ASSUMED_OPTIONS", {})
  given = model_options or {}
  assumed = {}
  for option, (reason, instead) in declared.get(model_name, {}).items():
    if option not in given:
      value = getattr(model, option)
      assumed[option] = (value, f"assumed {option}={value!r} ({reason}); pass --model_option "
                                f"{instead}")
  return assumed


def make_provenance(model_name: str, source: str, path: str, variables: Any,
                    entry: registry.PretrainedWeights | None,
                    model_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The facts a tlflax checkpoint records about its weights.

  Preprocessing and class names come from the registry entry the file is
  (by id or by file name), else from the model's usual weights.
  "model_options" are the options the network is built with wherever the
  checkpoint is used (those given, and those `assumed_options` assumed).

  Examples:
    >>> make_provenance("resnet18", "torchvision", "r18.pth", variables, None)["num_classes"]
    1000
  """
  entry = entry or registry.matching_entry(model_name, path)
  head = flatten(variables).get("params/head/kernel")
  num_classes = None if head is None else int(np.shape(head)[-1])
  preprocessing = (entry.preprocessing if entry
                   else registry.default_preprocessing(model_name))
  if entry and entry.class_names:
    class_names = entry.class_names
  else:
    class_names = "imagenet1k" if num_classes == 1000 else None
  return {
      "model_name": model_name,
      "source": source,
      "weight_id": entry.id if entry else None,
      "input_file": os.path.basename(os.path.normpath(path)),
      "input_sha256": download.file_digest(path) if os.path.isfile(path) else None,
      "num_classes": num_classes,
      "preprocessing": preprocessing.to_dict(),
      "class_names": class_names,
      "model_options": dict(model_options or {}),
  }


def convert(model_name: str, input_name: str, output: str, source: str | None = None,
            overwrite: bool = False, model_options: Mapping[str, Any] | None = None
            ) -> Conversion:
  """Loads weights of any source and saves them as a tlflax checkpoint.

  Args:
    model_name: a name from `tlflax.models.model_names()`.
    input_name: a weight file or a pretrained id.
    output: the checkpoint directory to write.
    source: "torchvision", "timm", "keras" or "tlflax"; optional for an id.
    overwrite: replace an existing checkpoint in `output`.
    model_options: options of the network the file cannot carry, e.g.
      `{"transform_input": False}` for an inception_v3 trained without it;
      recorded in the checkpoint. Options the family assumes instead are
      logged (see `assumed_options`) and recorded too.

  Returns:
    A `Conversion` (printing it gives the summary line).

  Examples:
    >>> print(convert("resnet18", "resnet18-f37072fd.pth", "ckpt/r18", "torchvision"))
    Wrote resnet18 (torchvision resnet18-f37072fd.pth) to /.../ckpt/r18: 11,689,512 parameters, 1000 classes.
  """
  if model_name not in models.model_names():
    raise WeightsError(f"Unknown model {model_name!r}. Known models: "
                       f"{', '.join(models.model_names())}.")
  model_options = dict(model_options or {})
  # Checked before reading (or downloading) anything.
  models.registry.check_options(model_name, model_options)
  if "num_classes" in model_options:
    raise WeightsError("The model option num_classes comes from the weights' head; leave it "
                       "out.")
  if registry.is_known(input_name) and not os.path.exists(input_name):
    # Checked before downloading anything.
    wanted = registry.get(input_name).model_name
    if wanted != model_name:
      raise WeightsError(f"{input_name!r} are weights for {wanted!r}, not {model_name!r}.")
  path, source, entry = resolve_input(input_name, source)
  variables = loader.load(model_name, path, source=source, **model_options)
  for option, (value, message) in assumed_options(model_name, model_options).items():
    if entry is None:  # a published id's settings are the publisher's, not a guess
      log.warning("%s: %s.", model_name, message)
    model_options[option] = value  # recorded, so a later default cannot change the network
  provenance = make_provenance(model_name, source, path, variables, entry, model_options)
  written = native.save(output, variables, provenance, overwrite=overwrite)
  num_parameters = sum(int(np.size(v)) for k, v in flatten(variables).items()
                       if k.startswith("params/"))
  return Conversion(written, native.read_provenance(written), num_parameters)
