"""Converting pretrained weights once into a tlflax checkpoint with its provenance.

`convert` loads weights of any source (a file, or a known id downloaded and
verified first) and saves them as a tlflax checkpoint that records where they
came from and how images must be prepared for them, so classifying with it
needs nothing else. The command line is `python -m tlflax.cli.convert`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from tlflax import models
from tlflax.tree import flatten
from tlflax.weights import download, loader, native, registry
from tlflax.weights.merge import WeightsError


@dataclasses.dataclass(frozen=True)
class Conversion:
  """What `convert` wrote."""
  output: str
  provenance: dict
  num_parameters: int

  def __str__(self):
    classes = self.provenance.get("num_classes")
    return (f"Wrote {self.provenance['model_name']} ({self.provenance['source']} "
            f"{self.provenance['input_file']}) to {self.output}: {self.num_parameters:,} "
            f"parameters, " + (f"{classes} classes." if classes else "no classifier head."))


def resolve_input(input_name: str, source: str | None) -> tuple[str, str, registry.PretrainedWeights | None]:
  """A file or pretrained id -> (local path, source, registry entry or None).

  Raises:
    WeightsError: a missing file that is no known id either, or a source
      that contradicts the id's.

  Example:
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


def make_provenance(model_name: str, source: str, path: str, variables: Any,
                    entry: registry.PretrainedWeights | None) -> dict[str, Any]:
  """The facts a tlflax checkpoint records about its weights.

  Preprocessing and class names come from the registry entry the file is
  (by id or by file name), else from the model's usual weights.

  Example:
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
  }


def convert(model_name: str, input_name: str, output: str, source: str | None = None,
            overwrite: bool = False) -> Conversion:
  """Loads weights of any source and saves them as a tlflax checkpoint.

  Args:
    model_name: a name from `tlflax.models.model_names()`.
    input_name: a weight file or a pretrained id.
    output: the checkpoint directory to write.
    source: "torchvision", "timm", "keras" or "tlflax"; optional for an id.
    overwrite: replace an existing checkpoint in `output`.

  Returns:
    A `Conversion` (printing it gives the summary line).

  Example:
    >>> print(convert("resnet18", "resnet18-f37072fd.pth", "ckpt/r18", "torchvision"))
    Wrote resnet18 (torchvision resnet18-f37072fd.pth) to /.../ckpt/r18: 11,689,512 parameters, 1000 classes.
  """
  if model_name not in models.model_names():
    raise WeightsError(f"Unknown model {model_name!r}. Known models: "
                       f"{', '.join(models.model_names())}.")
  if registry.is_known(input_name) and not os.path.exists(input_name):
    # Checked before downloading anything.
    wanted = registry.get(input_name).model_name
    if wanted != model_name:
      raise WeightsError(f"{input_name!r} are weights for {wanted!r}, not {model_name!r}.")
  path, source, entry = resolve_input(input_name, source)
  variables = loader.load(model_name, path, source=source)
  provenance = make_provenance(model_name, source, path, variables, entry)
  written = native.save(output, variables, provenance, overwrite=overwrite)
  num_parameters = sum(int(np.size(v)) for k, v in flatten(variables).items()
                       if k.startswith("params/"))
  return Conversion(written, native.read_provenance(written), num_parameters)
