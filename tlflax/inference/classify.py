"""Runs a pretrained classifier as it is on images and folders: top guesses, and accuracy.

    tlflax classify --model resnet50 --weights resnet50.tv2_in1k cat.jpg dog.png
    tlflax classify --weights ckpt/resnet50 --top_k 3 photos/*.jpg
    tlflax classify --weights workdirs/flowers data/flowers/val --output_dir val_report
    tlflax classify --model resnet18 --weights r18.pth --source torchvision \\
        --class_names my_classes.txt --image_size 160 cat.jpg

`--weights` is a training run's workdir, a tlflax checkpoint directory, a
pretrained id, or a weight file. Preprocessing and class names come from the
run, the checkpoint's provenance or the registry entry (a file is matched to
an entry by its name), and can be overridden. For a run, a checkpoint or an
id `--model` may be left out.

Folders of images, and the accuracy when their sub-folders are named after
the model's classes: `tlflax.inference.image_folders`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import numpy as np

from tlflax import models, weights
from tlflax.data import images
from tlflax.tree import flatten
from tlflax.training import workdir as workdir_lib
from tlflax.weights import native, registry
from tlflax.weights.merge import WeightsError

BATCH_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Guess:
  """One of a model's top answers for an image."""
  index: int
  name: str
  probability: float


@dataclasses.dataclass(frozen=True)
class Classifier:
  """Everything `classify` needs, as `load_classifier` finds it."""
  model_name: str
  variables: Any
  preprocessing: images.Preprocessing
  class_names: list[str] | None
  description: str
  # Options the network is built with (recorded by the checkpoint or run, or given).
  model_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def classify(model_name: str, variables: Any, image_paths: Sequence[str | os.PathLike],
             preprocessing: images.Preprocessing = images.TORCH,
             class_names: Sequence[str] | None = None, top_k: int = 5,
             batch_size: int = BATCH_SIZE,
             model_options: dict[str, Any] | None = None) -> list[list[Guess]]:
  """The top-k classes of each image, with softmax probabilities.

  Args:
    model_name: a name from `tlflax.models.model_names()`.
    variables: `{"params", "batch_stats"}` with a classifier head.
    image_paths: image files.
    preprocessing: how the weights expect images to be prepared.
    class_names: one name per output class; "class <i>" when None.
    top_k: how many guesses per image.
    batch_size: images per forward pass.
    model_options: other options of the network (e.g. `{"transform_input":
      False}`); `Classifier.model_options` of `load_classifier`.

  Returns:
    One list of `Guess`es per image, most probable first.

  Examples:
    >>> variables = tlflax.weights.load("resnet50", "resnet50.tv2_in1k")
    >>> guesses = classify("resnet50", variables, ["cat.jpg"],
    ...                    registry.get("resnet50.tv2_in1k").preprocessing,
    ...                    registry.class_names("imagenet1k"))
    >>> guesses[0][0].name
    'tabby'
  """
  head = flatten(variables).get("params/head/kernel")
  if head is None:
    raise WeightsError(f"These {model_name} weights have no classifier head; there is "
                       "nothing to classify with.")
  num_classes = int(np.shape(head)[-1])
  if class_names is not None and len(class_names) != num_classes:
    raise WeightsError(f"The model has {num_classes} classes but {len(class_names)} "
                       "class names were given.")
  names = list(class_names) if class_names is not None else [f"class {i}" for i in range(num_classes)]
  model = models.get_model(model_name, num_classes=num_classes, **(model_options or {}))

  # Variables as an argument, not a closure: XLA would embed them as constants.
  @jax.jit
  def probabilities(variables, batch):
    logits = model.apply(variables, batch, train=False)
    return jax.nn.softmax(logits.astype(np.float32), axis=-1)

  image_paths = list(image_paths)
  top_k = max(1, min(top_k, num_classes))
  results = []
  for start in range(0, len(image_paths), batch_size):
    batch = images.preprocess(image_paths[start:start + batch_size], preprocessing)
    for row in np.asarray(probabilities(variables, batch)):
      best = np.argsort(-row, kind="stable")[:top_k]
      results.append([Guess(int(i), names[i], float(row[i])) for i in best])
  return results


def load_classifier(weights_arg: str, model_name: str | None = None,
                    source: str | None = None,
                    model_options: dict[str, Any] | None = None) -> Classifier:
  """Loads weights with the preprocessing and class names that belong to them.

  Args:
    weights_arg: a training run's workdir, a tlflax checkpoint directory, a
      pretrained id, or a file.
    model_name: the model; optional for a workdir, a checkpoint or an id.
    source: the file's framework (only needed for a plain file); "workdir"
      insists on a training run.
    model_options: options of the network (`--model_option`), over those a
      checkpoint or a training run recorded.

  Returns:
    A `Classifier`; `class_names` is None when no list is known.

  Examples:
    >>> classifier = load_classifier("ckpt/resnet50")
    >>> classifier.preprocessing.crop_size
    224
  """
  if model_name and model_options:  # a misspelt option fails before any weights are read
    models.registry.check_options(model_name, model_options)
  if source in (None, "workdir") and workdir_lib.is_training_workdir(weights_arg):
    # A training run: its final weights, with its own eval preprocessing and classes.
    config = workdir_lib.read_config(weights_arg)
    model_name = model_name or config["model"]["name"]
    recorded = models.registry.parse_model_options(config["model"].get("options", ""),
                                                   where=f"{weights_arg}'s config.model.options ")
    from tlflax.training import checkpoint  # pylint: disable=import-outside-toplevel
    variables = checkpoint.restore_params_only(weights_arg)
    data_config = config["data"]
    size = int(data_config["image_size"])
    preprocessing = images.Preprocessing(crop_size=size,
                                         resize_size=int(data_config["resize_size"]) or size,
                                         mean=tuple(data_config["mean"]),
                                         std=tuple(data_config["std"]))
    names = workdir_lib.read_class_names(weights_arg)
    description = f"the final weights of the training run {weights_arg}"
  elif os.path.isdir(weights_arg) and source in (None, "tlflax"):
    provenance = native.read_provenance(weights_arg)
    model_name = model_name or provenance["model_name"]
    recorded = native.model_options(provenance)
    variables = weights.load(model_name, weights_arg, source="tlflax")
    preprocessing = images.Preprocessing(**provenance["preprocessing"])
    names = provenance.get("class_names")
    description = (f"tlflax checkpoint {weights_arg} "
                   f"({provenance.get('weight_id') or provenance.get('input_file')})")
  elif not os.path.exists(weights_arg) and registry.is_known(weights_arg):
    entry = registry.get(weights_arg)
    model_name = model_name or entry.model_name
    variables = weights.load(model_name, weights_arg, source=source)
    preprocessing, names, description = entry.preprocessing, entry.class_names, entry.id
    recorded = {}
  else:
    if model_name is None:
      raise WeightsError(f"Say which model {weights_arg!r} is for with --model.")
    variables = weights.load(model_name, weights_arg, source=source)
    entry = registry.matching_entry(model_name, weights_arg)
    head = flatten(variables).get("params/head/kernel")
    if entry:
      preprocessing, names = entry.preprocessing, entry.class_names
    else:
      preprocessing = registry.default_preprocessing(model_name)
      names = "imagenet1k" if head is not None and head.shape[-1] == 1000 else None
    description = f"{source} file {weights_arg}" + (f" ({entry.id})" if entry else "")
    recorded = {}
  if isinstance(names, str):
    names = registry.class_names(names)
  options = {**recorded, **(model_options or {})}
  if "num_classes" in options:
    raise WeightsError("The model option num_classes comes from the weights' head; leave it "
                       "out.")
  models.registry.check_options(model_name, options)
  if options:
    description += f", model options {models.registry.format_model_options(options)}"
  return Classifier(model_name, variables, preprocessing, names, description, options)


def read_class_names(path: str | os.PathLike) -> list[str]:
  """One class name per line (trailing blank lines ignored)."""
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\r\n") for line in f]
  while lines and not lines[-1].strip():
    lines.pop()
  return lines


def format_guesses(image_path: str, guesses: Sequence[Guess]) -> str:
  """`cat.jpg` followed by one indented "probability  name" line per guess."""
  return "\n".join([str(image_path)]
                   + [f"  {g.probability:7.2%}  {g.name}" for g in guesses])
