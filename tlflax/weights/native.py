"""tlflax's own checkpoint of converted weights: converted once, loaded fast, self-describing.

A checkpoint is a directory:

    DIR/provenance.json   what the weights are, where they came from, how to
                          prepare images for them, the model options the
                          network is built with
    DIR/variables/        an orbax checkpoint of {"params": ..., "batch_stats": ...}

    >>> save("ckpt/resnet50", variables, {"model_name": "resnet50", "source": "torchvision"})
    >>> variables = tlflax.weights.load("resnet50", "ckpt/resnet50", source="tlflax")
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from tlflax import files
from tlflax.tree import flatten
from tlflax.weights.merge import WeightsError

PROVENANCE_FILE = "provenance.json"
VARIABLES_DIR = "variables"
# Written into provenance.json so a later tlflax can tell old layouts apart.
FORMAT = "tlflax-weights"
FORMAT_VERSION = 1


def tlflax_version() -> str:
  try:
    return importlib.metadata.version("tlflax")
  except importlib.metadata.PackageNotFoundError:  # running from a plain checkout
    return "unknown"


def is_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds a tlflax checkpoint (judged by its provenance.json)."""
  return os.path.isfile(os.path.join(directory, PROVENANCE_FILE))


def save(directory: str | os.PathLike, variables: Mapping[str, Any],
         provenance: Mapping[str, Any], overwrite: bool = False) -> str:
  """Writes `variables` and their provenance as a tlflax checkpoint.

  The checkpoint is assembled in a temporary directory beside `directory` and
  moved into place at the end, so a failure leaves no half-written checkpoint.

  Args:
    directory: the checkpoint directory; must be missing or empty unless
      `overwrite`.
    variables: `{"params": ..., "batch_stats": ...}` (numpy or jax arrays).
    provenance: JSON-serialisable facts; must name "model_name". "format",
      "format_version", "tlflax_version" and "created" (UTC, ISO 8601) are
      added.
    overwrite: replace an existing tlflax checkpoint. A non-empty directory
      that is not a tlflax checkpoint is never deleted.

  Returns:
    The absolute path of the checkpoint.

  Raises:
    WeightsError: a non-empty `directory` without `overwrite`, or one that is
      not a checkpoint; provenance without "model_name".

  Examples:
    >>> save("/tmp/r18", variables, {"model_name": "resnet18", "source": "torchvision"})
    '/tmp/r18'
  """
  directory = os.path.abspath(os.fspath(directory))
  if not provenance.get("model_name"):
    raise WeightsError("The provenance must name the model (\"model_name\").")
  if os.path.exists(directory):
    if not os.path.isdir(directory):
      raise WeightsError(f"{directory} exists and is not a directory.")
    if os.listdir(directory):
      if not overwrite:
        raise WeightsError(f"{directory} is not empty; choose another directory, or "
                           "pass overwrite=True (--overwrite) to replace the checkpoint in it.")
      if not is_checkpoint(directory):
        raise WeightsError(f"{directory} is not empty and is not a tlflax checkpoint "
                           f"(no {PROVENANCE_FILE}); refusing to delete what it holds.")
  record = dict(provenance, format=FORMAT, format_version=FORMAT_VERSION,
                tlflax_version=tlflax_version(),
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  # Plain numpy arrays: restoring then needs no devices or shardings.
  arrays = jax.tree_util.tree_map(np.asarray, jax.device_get(dict(variables)))

  # Staged beside `directory` and renamed into place once complete.
  with files.atomic_directory(directory, replace=True) as staging:
    _write_variables(os.path.join(staging, VARIABLES_DIR), arrays)
    files.write_json(os.path.join(staging, PROVENANCE_FILE), record, indent=2, sort_keys=True)
  return directory


def _write_variables(path: str, arrays: Mapping[str, Any]) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  # Leaving the `with` waits for the (asynchronous) save to finish.
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, arrays)


def read_provenance(directory: str | os.PathLike) -> dict[str, Any]:
  """The provenance.json of a tlflax checkpoint.

  Raises:
    WeightsError: `directory` is not a tlflax checkpoint (saying what it holds).

  Examples:
    >>> read_provenance("/tmp/r18")["model_name"]
    'resnet18'
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    what = "does not exist" if not os.path.exists(directory) else "is a file, not a directory"
    raise WeightsError(f"{directory!r} {what}; a tlflax checkpoint is a directory "
                       "written by `python -m tlflax.cli.convert`.")
  path = os.path.join(directory, PROVENANCE_FILE)
  if not os.path.isfile(path):
    if os.path.isfile(os.path.join(directory, "config.json")) and os.path.isdir(
        os.path.join(directory, "checkpoints")):
      raise WeightsError(
          f"{directory!r} is a training run's workdir, not a converted tlflax checkpoint. "
          "Start another run from it with config.init.source='workdir'; classify with it "
          "by passing the workdir itself (python -m tlflax.cli.classify --weights "
          f"{directory} IMAGE...).")
    raise WeightsError(f"{directory!r} is not a tlflax checkpoint (no {PROVENANCE_FILE}); "
                       f"it holds {_describe_contents(directory)}.")
  try:
    with open(path, encoding="utf-8") as f:
      provenance = json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f"Could not read {path}: {e}") from e
  if not isinstance(provenance, dict) or provenance.get("format") != FORMAT:
    raise WeightsError(f"{path} is not tlflax provenance (no \"format\": \"{FORMAT}\").")
  return provenance


def model_options(provenance: Mapping[str, Any]) -> dict[str, Any]:
  """The model options a checkpoint's network is built with (its "model_options").

  JSON has no tuples, so lists come back as tuples (a module's fields must be
  hashable, e.g. `frozen_batchnorm`). A checkpoint written before options
  were recorded gives `{}`.

  Examples:
    >>> model_options(read_provenance("ckpt/inception"))
    {'transform_input': False}
  """
  def as_tuples(value):
    return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value
  return {key: as_tuples(value) for key, value in (provenance.get("model_options") or {}).items()}


def _describe_contents(directory: str) -> str:
  names = sorted(os.listdir(directory))
  if not names:
    return "nothing"
  if "_CHECKPOINT_METADATA" in names or any(n.endswith(".ocdbt") for n in names):
    return "what looks like a bare orbax checkpoint (e.g. a training state), not converted weights"
  shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
  return shown


def convert(model_name: str, path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a tlflax checkpoint as `{"params/stem/conv/kernel": array, ...}`.

  Args:
    model_name: the model the weights must be for.
    path: the checkpoint directory.

  Returns:
    The flat variables, as numpy arrays exactly as saved.

  Raises:
    WeightsError: not a tlflax checkpoint, or one for another model.

  Examples:
    >>> convert("resnet18", "/tmp/r18")["params/head/kernel"].shape
    (512, 1000)
  """
  provenance = read_provenance(path)
  if provenance.get("model_name") != model_name:
    origin = provenance.get("input_file") or provenance.get("weight_id") or "unknown input"
    raise WeightsError(
        f"{os.fspath(path)!r} holds {provenance.get('model_name')!r} weights "
        f"(converted from {provenance.get('source')} file {origin!r}), not {model_name!r}.")
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  variables_path = os.path.abspath(os.path.join(os.fspath(path), VARIABLES_DIR))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(variables_path)
  except Exception as e:  # orbax raises several types for missing or broken files
    raise WeightsError(f"Could not read the variables of checkpoint {os.fspath(path)!r}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  return {key: np.asarray(value) for key, value in flatten(restored).items()}
