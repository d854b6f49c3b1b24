"""A pretrained network as a standalone feature extractor: images in, arrays out.

    python -m tlflax.features --config configs/digits.py --output features/digits \\
        --config.init.weights=workdirs/digits --config.init.source=workdir --stage stage3

runs the backbone in inference mode over every example of each split (eval
preprocessing, no augmentation, in dataset order) and writes

    DIR/<split>_features.npy   float32 (examples, C); (examples, H, W, C) with --pool none
    DIR/<split>_labels.npy     int32 (examples,)
    DIR/info.json              model, weights, stage, pool, shapes, class names, data config

`--stage` is any stage of the model (`stem`, `stage1`..., VGG `fc`),
`pre_logits` (the pooled vector the head sees) or `logits` (weights with a
head only). A body stage runs a model truncated there, so nothing after it is
computed. Weights come from the config as for training (`config.init.weights`
and `config.init.source`, `source="workdir"` for a training run's final
state); without weights the network is randomly initialised (a baseline). Any
config key can be overridden with `--config.key=value`. `load(DIR, split)`
reads the arrays back; `tlflax.linear_probe` fits linear heads on them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
import tqdm

from tlflax import checkpoint, data, models, train
from tlflax.weights import pretrained as pretrained_ids
from tlflax.weights.common import WeightsError, flatten, merge_pretrained, model_shapes, unflatten

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "eval")
POOLS = ("avg", "none")
INFO_FILE = "info.json"
# Files this module (and the linear probe on its output) writes into a directory.
_OWN_FILES = tuple(f"{split}_{kind}.npy" for split in SPLITS for kind in ("features", "labels")
                   ) + (INFO_FILE, "linear_probe.json")


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A model ready to extract one stage, as `load_backbone` builds it.

  Attributes:
    model: the module, truncated after the stage where it is a body stage.
    variables: its `{"params", "batch_stats"}`.
    stage: the feature to extract.
    description: what the weights are (for `info.json`).
  """
  model: Any
  variables: Any
  stage: str
  description: dict


def feature_names(model) -> list[str]:
  """The features `extract` can read from `model`, input side first.

  Args:
    model: a backbone from `tlflax.models.get_model`.

  Returns:
    Its stages up to `last_stage` (if truncated), then "pre_logits", then
    "logits" when it has a head.

  Example:
    >>> feature_names(models.get_model("cifar_resnet20"))
    ['stem', 'stage1', 'stage2', 'stage3', 'pre_logits', 'logits']
  """
  stages = list(model.stage_names)
  if getattr(model, "last_stage", None):
    stages = stages[:stages.index(model.last_stage) + 1]
  names = stages + [models.PRE_LOGITS]
  if getattr(model, "num_classes", None) is not None:
    names.append("logits")
  return names


def check_stage(model, stage: str, model_name: str = "this model") -> None:
  """Raises a ValueError listing the choices if `model` has no feature `stage`."""
  names = feature_names(model)
  if stage not in names:
    extra = (" ('logits' needs weights with a classifier head)"
             if stage == "logits" else "")
    raise ValueError(f"Unknown stage {stage!r} for {model_name}{extra}; choose one of "
                     f"{', '.join(names)} with --stage.")


def model_for_stage(model, stage: str):
  """`model` cut down to what computing `stage` needs.

  A body stage gets `last_stage=stage` and no head, so the stages after it
  are never run; "pre_logits" drops the head; "logits" keeps the model.

  Args:
    model: a backbone from `tlflax.models.get_model`.
    stage: one of `feature_names(model)`.

  Returns:
    A linen module whose variables are a subset of `model`'s.
  """
  check_stage(model, stage)
  if stage == "logits":
    return model
  if stage == models.PRE_LOGITS:
    return model.clone(num_classes=None)
  return model.clone(num_classes=None, last_stage=stage)


def variables_for(model, variables, image_size: int):
  """The part of `variables` that `model` (e.g. a truncated one) uses.

  Args:
    model: the module the variables will be applied with.
    variables: variables of a model that contains it (same names).
    image_size: input side, to trace `model.init` (no computation).

  Returns:
    `variables` restricted to the names `model.init` creates.
  """
  wanted = model_shapes(model, image_size)
  flat = flatten(variables)
  missing = sorted(wanted.keys() - flat.keys())
  if missing:
    raise ValueError(f"The variables lack {len(missing)} entries the model needs, e.g. "
                     f"{missing[:3]}.")
  return unflatten({k: v for k, v in flat.items() if k in wanted})


def extract(model, variables, dataset, stage: str, pool: str = "avg",
            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Features of one stage for every example of an evaluation dataset.

  Runs the model in inference mode (BatchNorm on running statistics), one
  compiled function for all batches; the padding rows of the last batch are
  dropped, so row i is example i of the split.

  Args:
    model: a backbone from `tlflax.models.get_model` (it is truncated here
      when `stage` is a body stage).
    variables: its `{"params", "batch_stats"}`.
    dataset: a `tlflax.data` Dataset built with `training=False`.
    stage: one of `feature_names(model)`, e.g. "stage3" or "pre_logits".
    pool: "avg" averages spatial maps over height and width to (N, C);
      "none" keeps (N, H, W, C). Vectors (pre_logits, logits, fc) stay (N, C).
    progress: show a tqdm progress bar.

  Returns:
    `(features, labels)`: float32 (num_examples, ...) and int32 (num_examples,).

  Example:
    >>> evaluation = data.build(config.data, split="eval", training=False,
    ...                         global_batch_size=200)
    >>> features, labels = extract(model, variables, evaluation, "stage2")
    >>> features.shape
    (180, 32)
  """
  if pool not in POOLS:
    raise ValueError(f"Unknown pool {pool!r}; use one of {POOLS}.")
  if dataset.training:
    raise ValueError("extract needs a dataset built with training=False: a training "
                     "dataset augments the images and drops the last partial batch.")
  if dataset.process_count != 1:
    raise ValueError("extract reads every example in one process; build the dataset with "
                     "process_count=1.")
  model = model_for_stage(model, stage)
  variables = variables_for(model, variables, dataset.image_size)

  # Variables as an argument, not a closure: XLA would embed them as constants.
  @jax.jit
  def features_of(variables, images):
    out = models.extract_features(model, variables, images, [stage])[stage]
    out = out.astype(jnp.float32)
    if pool == "avg" and out.ndim == 4:
      out = jnp.mean(out, axis=(1, 2))
    return out

  features = labels = None
  done = 0
  batches = tqdm.tqdm(dataset.batches(epoch=0), total=dataset.steps_per_epoch,
                      desc=f"{stage} features", unit="batch", disable=not progress)
  for batch in batches:
    real = batch["mask"] > 0
    out = np.asarray(features_of(variables, batch["image"]))[real]
    if features is None:  # allocated once the per-example shape is known
      features = np.empty((dataset.num_examples, *out.shape[1:]), np.float32)
      labels = np.empty((dataset.num_examples,), np.int32)
    features[done:done + len(out)] = out
    labels[done:done + len(out)] = batch["label"][real]
    done += len(out)
  if features is None:
    raise ValueError("The dataset has no examples to extract features from.")
  if done != dataset.num_examples:
    raise RuntimeError(f"Read {done} examples, expected {dataset.num_examples}.")
  return features, labels


def read_weights(config) -> dict | None:
  """The pretrained variables named by `config.init`, or None for none.

  Args:
    config: a tlflax config; `init.source="workdir"` reads a training run's
      final `{"params", "batch_stats"}`, any other source goes through
      `tlflax.weights.load`.

  Returns:
    `{"params", "batch_stats"}` or None when `config.init.weights` is empty.

  Raises:
    WeightsError, checkpoint.CheckpointError: missing or unusable weights,
      saying what to pass instead.
  """
  path = config.init.weights
  if not path:
    return None
  if config.init.source == "workdir":
    try:
      return train.read_pretrained(config)
    except checkpoint.CheckpointError as e:
      raise checkpoint.CheckpointError(
          f"With --config.init.source=workdir, --config.init.weights must be a training "
          f"run's workdir: {e}") from e
  if not os.path.exists(path) and not pretrained_ids.is_known(path):
    raise WeightsError(
        f"Weight file {path!r} does not exist and is no known pretrained id. Pass an "
        "existing file or tlflax checkpoint with --config.init.weights=PATH (and "
        "--config.init.source=torchvision|timm|keras|tlflax), a training run with "
        "--config.init.source=workdir, or an id from tlflax.weights.pretrained.list_ids().")
  return train.read_pretrained(config)


def describe_weights(config) -> dict:
  """The model and weights a config names, as `info.json` records them."""
  return {"model": config.model.name, "dtype": config.model.dtype,
          "last_stage": config.model.last_stage, "weights": config.init.weights,
          "source": config.init.source,
          "start": "pretrained" if config.init.weights else "scratch"}


def load_backbone(config, stage: str, image_size: int | None = None) -> Backbone:
  """The configured model and weights, ready to extract `stage`.

  The model is `config.model` (name, dtype, last_stage); the weights are
  `config.init.weights`/`config.init.source` as for training. The head is
  kept only for `stage="logits"` (with the weights' own number of classes).

  Args:
    config: a tlflax config (see `tlflax.defaults`).
    stage: one of `feature_names` of the model, e.g. "stage3".
    image_size: input side used to initialise; `config.data.image_size` by default.

  Returns:
    A `Backbone`.

  Raises:
    ValueError: an unknown stage (the message lists the model's stages).
    WeightsError, checkpoint.CheckpointError: weights that cannot be read.
  """
  name = config.model.name
  image_size = image_size or int(config.data.image_size)
  options = {"last_stage": config.model.last_stage} if config.model.last_stage else {}
  # Checked before reading any weights (with the constructor's head), so a
  # typo fails at once; "logits" is checked again against the weights' head.
  check_stage(models.get_model(name, dtype=config.model.dtype, **options), stage, repr(name))
  pretrained = read_weights(config)
  if pretrained is not None:
    # Without weights the constructor's default head stays (a random baseline).
    head = flatten(pretrained).get("params/head/kernel")
    options["num_classes"] = None if head is None else int(np.shape(head)[-1])
  full_model = models.get_model(name, dtype=config.model.dtype, **options)
  check_stage(full_model, stage, repr(name))
  model = model_for_stage(full_model, stage)

  if pretrained is None:
    log.warning("No config.init.weights: features of a randomly initialised %s (seed %d).",
                name, config.seed)
    variables = train.init_variables(model, config.seed, (image_size, image_size, 3))
  else:
    # Every variable comes from the file, so the model is traced for its
    # shapes, not initialised (compiling init's random draws takes seconds).
    # The file holds the whole network; the stages after `stage` are left out.
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, image_size, image_size, 3)))
    template = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
    needed = flatten(template).keys()
    used = {k: v for k, v in flatten(pretrained).items() if k in needed}
    variables, report = merge_pretrained(template, unflatten(used), reinit=())
    log.info("Weights %s: %s", config.init.weights, report)
  variables = jax.tree.map(np.asarray, variables)
  return Backbone(model, variables, stage, describe_weights(config))


def load(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads the features and labels `python -m tlflax.features` wrote.

  Args:
    directory: the `--output` directory.
    split: "train" or "eval".

  Returns:
    `(features, labels)`: float32 and int32 arrays, one row per example.

  Example:
    >>> train_x, train_y = load("features/digits", "train")
  """
  directory = os.fspath(directory)
  paths = [os.path.join(directory, f"{split}_{kind}.npy") for kind in ("features", "labels")]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"No {split} features in {directory!r} ({', '.join(missing)} missing); write them "
        f"with: python -m tlflax.features --config ... --output {directory} --splits {split}")
  features, labels = (np.load(p) for p in paths)
  if len(features) != len(labels):
    raise ValueError(f"{paths[0]} has {len(features)} rows but {paths[1]} has {len(labels)}.")
  return features, labels


def read_info(directory: str | os.PathLike) -> dict:
  """The `info.json` of a features directory (model, stage, shapes, class names...)."""
  path = os.path.join(os.fspath(directory), INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; {directory!r} holds no features "
                            "written by python -m tlflax.features.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _as_json(value):
  """`value` as it reads back from JSON (tuples become lists), to compare with a file."""
  return json.loads(json.dumps(value))


def existing_info(directory: str, extraction: dict, overwrite: bool) -> dict | None:
  """The info of `directory` if it holds features of this same extraction.

  Args:
    directory: the output directory (it may not exist yet).
    extraction: what defines the features (model, weights, stage, pool, data).
    overwrite: allow replacing features of another extraction.

  Returns:
    The existing info dict when `extraction` matches (new splits are then
    added to it); None when there is nothing to keep.

  Raises:
    FileExistsError: the directory holds other files this module writes and
      `overwrite` is False; the message says what differs.
  """
  present = _own_files(directory)
  if not present:
    return None
  info = None
  if INFO_FILE in present:
    info = read_info(directory)
    if info.get("extraction") == _as_json(extraction):
      return info
  if overwrite:
    return None
  if info is None:
    why = f"holds {', '.join(present)} without an {INFO_FILE}"
  else:
    old, new = info.get("extraction", {}), _as_json(extraction)
    differences = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
                   for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    why = "holds features of a different extraction (" + "; ".join(differences) + ")"
  raise FileExistsError(f"{directory!r} {why}. Choose another --output, or pass "
                        "--overwrite to replace them.")


def _own_files(directory: str) -> list[str]:
  return [f for f in _OWN_FILES if os.path.exists(os.path.join(directory, f))]


def extract_to_directory(config, output: str, stage: str = models.PRE_LOGITS,
                         splits: Sequence[str] = SPLITS, pool: str = "avg",
                         overwrite: bool = False, progress: bool = True) -> dict:
  """What the command line does: extract `splits` and write them under `output`.

  A directory holding features of the same extraction keeps them (other
  splits are added); one holding anything else this module writes is refused
  unless `overwrite`, which removes those files once the model has loaded.

  Args:
    config: a tlflax config (model, init weights, data, eval_batch_size, seed).
    output: the directory to write.
    stage: the feature to extract (see `feature_names`).
    splits: any of "train" and "eval" (the config's train/eval splits).
    pool: "avg" or "none" (see `extract`).
    overwrite: replace features of another extraction in `output`.
    progress: show progress bars.

  Returns:
    The info dict written to `output/info.json`.
  """
  splits = list(dict.fromkeys(splits))
  unknown = [s for s in splits if s not in SPLITS]
  if unknown or not splits:
    raise ValueError(f"Unknown splits {unknown}; use one or both of {', '.join(SPLITS)} "
                     "(the config's data.train_split and data.eval_split).")
  if pool not in POOLS:
    raise ValueError(f"Unknown pool {pool!r}; use one of {POOLS}.")
  data_config = config.data.to_dict()
  data_config.pop("augment")  # features are never augmented: it changes nothing here
  extraction = {**describe_weights(config), "stage": stage, "pool": pool, "seed": config.seed,
                "data": data_config}
  # Refused before anything is loaded; nothing is removed unless loading worked.
  info = existing_info(output, extraction, overwrite)
  backbone = load_backbone(config, stage)
  if info is None:
    for name in _own_files(output):
      os.remove(os.path.join(output, name))
    info = {"format_version": FORMAT_VERSION, "extraction": _as_json(extraction), "splits": {}}
  os.makedirs(output, exist_ok=True)
  for split in splits:
    dataset = data.build(config.data, split=split, training=False,
                         global_batch_size=config.eval_batch_size, seed=config.seed)
    features, labels = extract(backbone.model, backbone.variables, dataset, stage, pool,
                               progress)
    np.save(os.path.join(output, f"{split}_features.npy"), features)
    np.save(os.path.join(output, f"{split}_labels.npy"), labels)
    info["class_names"] = list(dataset.class_names)
    info["num_classes"] = dataset.num_classes
    info["preprocessing"] = _as_json(dataset.preprocessing.to_dict())
    info["splits"][split] = {"num_examples": int(dataset.num_examples),
                             "features_shape": list(features.shape),
                             "labels_shape": list(labels.shape)}
    # Written after every split, so a directory never lists a split it lacks.
    with open(os.path.join(output, INFO_FILE), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=1)
  return info


def run_command_line() -> None:
  """`python -m tlflax.features`: parses the flags and calls `extract_to_directory`.

  The flags are defined here, not on import, so importing this module next
  to `tlflax.main` (which also has --config) defines nothing twice.
  """
  config = config_flags.DEFINE_config_file("config", None, "A get_config() file in configs/.",
                                           lock_config=True)
  output = flags.DEFINE_string("output", None, "Directory for the .npy files and info.json.")
  stage = flags.DEFINE_string("stage", models.PRE_LOGITS,
                              "stem, stageK, fc (VGG), pre_logits or logits.")
  splits = flags.DEFINE_list("splits", list(SPLITS), "Comma-separated: train, eval or both.")
  pool = flags.DEFINE_enum("pool", "avg", list(POOLS),
                           "avg: global average of spatial maps; none: keep (H, W, C).")
  overwrite = flags.DEFINE_bool("overwrite", False,
                                "Replace features of a different extraction in --output.")
  flags.mark_flags_as_required(["config", "output"])

  def main(argv) -> int:
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("tlflax").setLevel(logging.INFO)
    try:
      info = extract_to_directory(config.value, output.value, stage.value, splits.value,
                                  pool.value, overwrite.value)
    except (ValueError, OSError) as e:
      # WeightsError and CheckpointError are ValueErrors; a refused or missing
      # directory is an OSError.
      print(f"tlflax.features: error: {e}", file=sys.stderr)
      return 1
    shapes = ", ".join(f"{name} {tuple(split['features_shape'])}"
                       for name, split in info["splits"].items())
    print(f"Wrote {stage.value} features of {config.value.model.name} to {output.value}: "
          f"{shapes}")
    return 0

  app.run(main)


if __name__ == "__main__":
  run_command_line()
