"""Converts pretrained weights once into a tlflax checkpoint.

    python -m tlflax.convert --source torchvision --model resnet50 \\
        --input resnet50-0676ba61.pth --output ckpt/resnet50
    python -m tlflax.convert --model resnet50 --input resnet50.tv2_in1k --output ckpt/r50v2

`--input` is a weight file or a known pretrained id (downloaded and verified
first; `--source` may then be left out). The checkpoint records where the
weights came from and how images must be prepared for them, so
`python -m tlflax.classify --weights ckpt/resnet50 ...` needs nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Sequence

import numpy as np

from tlflax import models, weights
from tlflax.weights import native, pretrained
from tlflax.weights.common import WeightsError, flatten


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


def resolve_input(input_name: str, source: str | None) -> tuple[str, str, pretrained.PretrainedWeights | None]:
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
                         f"(one of {', '.join(weights.SOURCES)}).")
    return input_name, source, None
  if not pretrained.is_known(input_name):
    raise WeightsError(f"{input_name!r} is neither an existing file nor a known pretrained "
                       "id (tlflax.weights.pretrained.list_ids() lists them).")
  entry = pretrained.get(input_name)
  if source not in (None, entry.source):
    raise WeightsError(f"{input_name!r} is {entry.source} weights, not {source}.")
  return pretrained.fetch(input_name), entry.source, entry


def make_provenance(model_name: str, source: str, path: str, variables: Any,
                    entry: pretrained.PretrainedWeights | None) -> dict[str, Any]:
  """The facts a tlflax checkpoint records about its weights.

  Preprocessing and class names come from the registry entry the file is
  (by id or by file name), else from the model's usual weights.

  Example:
    >>> make_provenance("resnet18", "torchvision", "r18.pth", variables, None)["num_classes"]
    1000
  """
  entry = entry or pretrained.matching_entry(model_name, path)
  head = flatten(variables).get("params/head/kernel")
  num_classes = None if head is None else int(np.shape(head)[-1])
  preprocessing = (entry.preprocessing if entry
                   else pretrained.default_preprocessing(model_name))
  if entry and entry.class_names:
    class_names = entry.class_names
  else:
    class_names = "imagenet1k" if num_classes == 1000 else None
  return {
      "model_name": model_name,
      "source": source,
      "weight_id": entry.id if entry else None,
      "input_file": os.path.basename(os.path.normpath(path)),
      "input_sha256": pretrained.file_digest(path) if os.path.isfile(path) else None,
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
  if pretrained.is_known(input_name) and not os.path.exists(input_name):
    # Checked before downloading anything.
    wanted = pretrained.get(input_name).model_name
    if wanted != model_name:
      raise WeightsError(f"{input_name!r} are weights for {wanted!r}, not {model_name!r}.")
  path, source, entry = resolve_input(input_name, source)
  variables = weights.load(model_name, path, source=source)
  provenance = make_provenance(model_name, source, path, variables, entry)
  written = native.save(output, variables, provenance, overwrite=overwrite)
  num_parameters = sum(int(np.size(v)) for k, v in flatten(variables).items()
                       if k.startswith("params/"))
  return Conversion(written, native.read_provenance(written), num_parameters)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m tlflax.convert",
      description="Convert pretrained weights into a tlflax checkpoint.")
  parser.add_argument("--source", choices=weights.SOURCES,
                      help="framework of the input file (optional for a pretrained id)")
  parser.add_argument("--model", required=True, help="tlflax model name, e.g. resnet50")
  parser.add_argument("--input", required=True, help="weight file or pretrained id")
  parser.add_argument("--output", required=True, help="checkpoint directory to write")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing checkpoint in --output")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    print(convert(args.model, args.input, args.output, args.source, args.overwrite))
  except (WeightsError, OSError) as e:  # OSError: e.g. an output folder we may not write
    print(f"tlflax.convert: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
