"""Every config key tlflax reads, with its default, and the numbers each key takes.

Config files in `configs/` start from `base_config()` and override keys; the
command line (`--config.key=value`) can override any of them, and a misspelt
key fails because the config is locked. A config file, a sweep point or a
stage can still set a key by mistake (`config.batch_sise = 32` adds a key to
an unlocked config), so every config that enters tlflax goes through
`check_config`: every key must be one of `base_config()`'s, and every number
must lie in its range in `VALUE_RANGES`, declared here beside the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Iterable, Mapping

import ml_collections

from tlflax import optim


class ConfigError(ValueError):
  """A config key that tlflax does not know, or a number its key cannot take."""


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The network: a registered name, its options, and where its weights come from.
  config.model = ml_collections.ConfigDict(dict(
      name="cifar_resnet20",
      dtype="float32",        # computation dtype; "bfloat16" on accelerators
      last_stage="",          # truncate after this stage ("" = whole network)
      head_init="lecun",      # a new head starts: lecun (flax default) | zeros (big_transfer)
      # Other settings of the network, those a weight file cannot carry: "KEY=VALUE, ..."
      # with Python literal values, e.g. "transform_input=False" for a torchvision
      # inception_v3 trained without it. One string, so the command line can set it
      # (--config.model.options="transform_input=False"); see `model_options`.
      options="",
  ))
  # Start-up order: resume from the workdir, else these weights, else scratch.
  config.init = ml_collections.ConfigDict(dict(
      weights="",             # weight file, tlflax checkpoint dir or pretrained id; "" = scratch
      source="",              # torchvision | timm | keras | tlflax ("" for an id) | workdir
      # Unset: keep the pretrained head if it predicts this task's classes (same names and
      # order), else a new head. True: keep it (it must fit). False: always a new head.
      keep_head=ml_collections.FieldReference(None, field_type=bool),
      up_to_stage="",         # copy only the stem ... this stage; later ones stay freshly initialised
  ))

  config.data = ml_collections.ConfigDict(dict(
      source="tfds",          # tfds | folder | digits
      name="",                # tfds name (e.g. "cifar10"), or the digits task ("source"/"target")
      data_dir="",            # tfds data_dir ("" = tfds default)
      path="",                # image folder root (one sub-folder per class)
      train_split="train",
      eval_split="test",
      image_size=32,          # network input size
      resize_size=0,          # eval: shorter side before centre crop (0 = image_size)
      # Pixels become (x / 255 - mean) / std, per RGB channel. Unset (()): the
      # scaling the starting weights expect (a pretrained id's published
      # preprocessing, a tlflax checkpoint's record, a continued run's), else
      # ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225); see
      # tlflax.build.with_data_normalization.
      mean=(),
      std=(),
      augment="crop_flip",    # crop_flip (pad 4 and crop) | random_resized_crop | none
      train_examples_per_class=0,  # few-shot subset of the train split (0 = all)
      # With a few-shot subset: evaluate on the eval split plus the train
      # examples left out of the subset (every image the run never saw).
      eval_on_unused_train=False,
      # Image folders: every file's header is checked before training; True
      # leaves out files that are no images (counted and named) instead of stopping.
      skip_bad_files=False,
      # Worker processes (Grain) that decode and augment batches: -1 = one per
      # CPU core where images are files to decode; 0 = threads in this process.
      num_workers=-1,
      # Who decodes and transforms image files: "pil" (Grain workers, any
      # host), "dali" (NVIDIA DALI on the GPU; pip install nvidia-dali-cuda120)
      # or "dali_cpu" (the same DALI graph on the host's cores). See
      # tlflax/data/dali_engine.py for what changes in the pixels.
      engine="pil",
  ))

  config.batch_size = 128     # global batch, split over all devices
  config.eval_batch_size = 256
  config.num_epochs = 10.0
  config.num_train_steps = 0  # > 0 overrides num_epochs

  config.freeze = ml_collections.ConfigDict(dict(
      rules="none",           # spec string (see tlflax.freeze.rules_from_spec)
      batchnorm_mode="frozen_layers",
  ))
  # Staged fine-tuning: a list of stage dicts (see tlflax.stages; recipes
  # stages.lp_ft, gradual_unfreezing, delayed_backbone). Empty: one stage made
  # of freeze.rules, optimizer and num_epochs / num_train_steps.
  config.stages = ()
  # A named staged recipe built over the run's length (num_train_steps, else
  # num_epochs), instead of writing config.stages: "" = none, "lp_ft" (linear
  # probe, then everything), "gradual_unfreezing" (one more stage per phase,
  # from the head down; equal phases) or "delayed_backbone" (the head alone,
  # then the backbone joins at recipe_backbone_multiplier times the rate).
  # Each stage's rate is optimizer.learning_rate unless said below.
  config.recipe = ""
  # lp_ft, delayed_backbone: the share of the run in which the head trains alone.
  config.recipe_head_fraction = 0.25
  config.recipe_head_learning_rate = 0.0  # lp_ft: the probe's rate (0 = optimizer.learning_rate)
  config.recipe_backbone_multiplier = 0.1  # delayed_backbone: the backbone's rate / the head's
  # Train a frozen prefix's output from a cache (see tlflax.training.prefix_cache);
  # used by stages whose stem and first stages are frozen, with data.augment="none".
  config.prefix_cache = ml_collections.ConfigDict(dict(
      enabled=False,
      directory="",           # "" = $TLFLAX_CACHE_DIR/prefix (~/.cache/tlflax/prefix)
  ))
  # JAX's persistent compilation cache (see tlflax.compilation): a step compiled
  # once is read from disk by later runs of the same program (a sweep's seeds).
  config.compilation_cache = ml_collections.ConfigDict(dict(
      enabled=True,
      directory="",           # "" = $JAX_COMPILATION_CACHE_DIR, else ~/.cache/tlflax/xla
      min_compile_seconds=1.0,  # faster-compiling programs are not stored
  ))
  config.optimizer = optim.default_config()
  config.label_smoothing = 0.0

  # `tlflax rank`: transferability scores of (source, stage) candidates on the
  # training split of config.data (see tlflax.inference.ranking).
  config.rank = ml_collections.ConfigDict(dict(
      # Comma-separated weights: pretrained ids, or MODEL=PATH for a file or checkpoint.
      sources="",
      stages="all",           # comma-separated stages, or "all": every stage and pre_logits
      scores="all",           # comma-separated (tlflax.transferability.SCORES), or "all"
      folds=5,                # cross-validation folds of the knn and linear_probe scores
  ))

  config.log_every_steps = 50
  config.eval_every_steps = 0     # 0 = once per epoch
  config.checkpoint_every_steps = 0  # 0 = once per epoch
  config.keep_checkpoints = 3
  config.best_metric = "eval/accuracy"  # also keep the best checkpoint by this

  # Multi-host: leave empty to let jax.distributed read the cluster (SLURM, TPU).
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False,
      coordinator_address="",
      num_processes=0,
      process_id=-1,
      cpu_collectives="gloo",  # how CPU-only processes talk to each other
  ))
  return config


# ----------------------------------------------------------------------------
# The numbers each key takes
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Range:
  """The numbers a config key takes, and what the key means (for the error).

  Attributes:
    meaning: what the key is, with what its special values mean, e.g.
      "the run's length in steps (0: num_epochs sets it)".
    minimum: the smallest value allowed...
    minimum_allowed: ...itself (`>=`), or only values above it (`>`).
    below: if given, values must be smaller than this.
    whole: only whole numbers (counts of steps, images, processes).
  """
  meaning: str
  minimum: float
  minimum_allowed: bool = True
  below: float | None = None
  whole: bool = False

  def allowed(self) -> str:
    """The allowed values in words, e.g. "a whole number >= 1"."""
    text = f"{'a whole number' if self.whole else 'a number'} " + (
        f"{'>=' if self.minimum_allowed else '>'} {self.minimum:g}")
    return text + (f" and < {self.below:g}" if self.below is not None else "")

  def contains(self, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return False
    if self.whole and value != int(value):
      return False
    above = value >= self.minimum if self.minimum_allowed else value > self.minimum
    return above and (self.below is None or value < self.below)

  def check(self, name: str, value: Any, key: str | None = None) -> None:
    """Raises ConfigError, one line, if `value` is out of range.

    Args:
      name: what the message calls the setting, e.g. "config.batch_size".
      value: its value.
      key: the key's own name in the message's explanation (default: the
        last part of `name`).
    """
    if not self.contains(value):
      key = key or name.rpartition(".")[2]
      raise ConfigError(f"{name}={value!r}: {key} is {self.meaning}; use {self.allowed()}.")


# Every numeric key whose values are limited, by its dotted path. A stage's
# optimizer settings (config.stages) are checked against the optimizer.* rows.
VALUE_RANGES = {
    "data.image_size": Range("the network's input size in pixels", 1, whole=True),
    "data.resize_size": Range("the evaluation images' shorter side before the centre crop, in "
                              "pixels (0: image_size)", 0, whole=True),
    "data.train_examples_per_class": Range("the training images used per class (0: all)", 0,
                                           whole=True),
    "data.num_workers": Range("the processes that decode images (-1: one per CPU core; 0: "
                              "threads in this process)", -1, whole=True),
    "batch_size": Range("the images of one training step, over all devices", 1, whole=True),
    "eval_batch_size": Range("the images of one evaluation batch, over all devices", 1,
                             whole=True),
    "num_epochs": Range("the run's length in passes over the training set (used when "
                        "num_train_steps is 0)", 0, minimum_allowed=False),
    "num_train_steps": Range("the run's length in steps (0: num_epochs sets it)", 0, whole=True),
    "label_smoothing": Range("the share of each label spread over all classes", 0, below=1),
    "optimizer.learning_rate": Range("the peak learning rate", 0, minimum_allowed=False),
    "optimizer.momentum": Range("SGD's momentum (0: none)", 0, below=1),
    "optimizer.b1": Range("AdamW's first-moment decay", 0, below=1),
    "optimizer.b2": Range("AdamW's second-moment decay", 0, below=1),
    "optimizer.weight_decay": Range("the weight decay (0: none)", 0),
    "optimizer.warmup_steps": Range("the steps of linear warmup (0: none)", 0, whole=True),
    "optimizer.grad_clip_norm": Range("the gradient norm clipped to (0: no clipping)", 0),
    "recipe_head_fraction": Range("the share of the run in which the recipe trains the head "
                                  "alone", 0, minimum_allowed=False, below=1),
    "recipe_head_learning_rate": Range("lp_ft's probe rate (0: optimizer.learning_rate)", 0),
    "recipe_backbone_multiplier": Range("delayed_backbone's backbone rate relative to the "
                                        "head's", 0, minimum_allowed=False),
    "compilation_cache.min_compile_seconds": Range(
        "the compile time below which a program is not cached, in seconds", 0),
    "rank.folds": Range("the cross-validation folds of the knn and linear_probe scores", 2,
                        whole=True),
    "log_every_steps": Range("the steps between logged training metrics", 1, whole=True),
    "eval_every_steps": Range("the steps between evaluations (0: once per epoch)", 0,
                              whole=True),
    "checkpoint_every_steps": Range("the steps between checkpoints (0: once per epoch)", 0,
                                    whole=True),
    "keep_checkpoints": Range("how many recent checkpoints are kept (the best one besides)", 1,
                              whole=True),
    "distributed.num_processes": Range("the processes of the job (0: read from the cluster)", 0,
                                       whole=True),
    "distributed.process_id": Range("this process's index (-1: read from the cluster)", -1,
                                    whole=True),
}


# ----------------------------------------------------------------------------
# Checking a config against the schema
# ----------------------------------------------------------------------------

def check_config(config: Mapping[str, Any], where: str = "the config") -> None:
  """Raises ConfigError if a key is outside the schema or a number outside its range.

  Call it where a config enters tlflax (the command lines, a sweep's points,
  `train_and_evaluate`), before anything is written.

  Args:
    config: a ConfigDict (or nested dict) meant to follow `base_config()`.
    where: where the config came from, for the message: the config file's
      path when known.

  Raises:
    ConfigError: one line naming the key, `where` and the nearest known key;
      or the key, its value, what it means and the values allowed. The
      stages (`config.stages`, `config.recipe`) are checked by
      `tlflax.stages.check_stages`.

  Examples:
    >>> config = base_config(); config.batch_sise = 32
    >>> check_config(config, "my_config.py")
    ConfigError: my_config.py sets config.batch_sise, which is no config key; did you mean
    config.batch_size? ...
  """
  schema = base_config()
  _check_keys(config, schema, "", where, set(schema_keys(schema)))
  for key, value_range in VALUE_RANGES.items():
    value_range.check(f"config.{key}", value_at(config, key))
  model_options(config, where)
  # tlflax.stages reads the ranges above, so it is imported here, not at the top.
  from tlflax import stages  # pylint: disable=import-outside-toplevel
  stages.check_stages(config)


# Fields of every model that other keys set, so config.model.options leaves them out.
_MODEL_FIELDS_SET_ELSEWHERE = {
    "num_classes": "the task's classes set it",
    "dtype": "set config.model.dtype",
    "last_stage": "set config.model.last_stage",
    "head_init": "set config.model.head_init",
    "image_size": "config.data.image_size sets it",
}


def model_options(config: Mapping[str, Any], where: str = "the config") -> dict[str, Any]:
  """`config.model.options` as keyword arguments of the model, checked against it.

  The options are one string, `"KEY=VALUE, ..."` with Python literal values
  (`tlflax.models.registry.parse_model_options`), rather than a block of
  keys: each model has its own fields, and the command line can set a string
  but cannot add keys to a locked block. Each key must be a field of
  `config.model.name`'s module; fields that have their own config key
  (dtype, last_stage, head_init, the image size, the head's classes) are
  set there instead.

  Raises:
    ConfigError: text that does not parse, an option the model does not
      have (naming its options and the nearest), or one set elsewhere.

  Examples:
    >>> config.model.name, config.model.options = "inception_v3", "transform_input=False"
    >>> model_options(config)
    {'transform_input': False}
  """
  from tlflax.models import registry  # pylint: disable=import-outside-toplevel
  text = config["model"].get("options", "")
  if not isinstance(text, str):
    raise ConfigError(f"{where} sets config.model.options={text!r}; write the options as one "
                      "string, e.g. \"transform_input=False, dropout_rate=0.2\".")
  try:
    options = registry.parse_model_options(text)
    for key in options:
      if key in _MODEL_FIELDS_SET_ELSEWHERE:
        raise ConfigError(f"{key} is not set here; {_MODEL_FIELDS_SET_ELSEWHERE[key]}.")
    if config["model"]["name"] in registry.model_names():
      registry.check_options(config["model"]["name"], options)
  except ValueError as e:
    raise ConfigError(f"{where}: config.model.options: {e}") from None
  return options


def schema_keys(schema: Mapping[str, Any] | None = None) -> list[str]:
  """Every dotted key of the schema, blocks (`data`) and leaves (`data.image_size`)."""
  schema = base_config() if schema is None else schema
  keys = []
  for key in schema.keys():
    keys.append(key)
    if isinstance(schema[key], ml_collections.ConfigDict):
      keys += [f"{key}.{inner}" for inner in schema_keys(schema[key])]
  return keys


def nearest_key(key: str, known: Iterable[str]) -> str | None:
  """The known dotted key a misspelt or misplaced `key` most likely means.

  The same name in another block first (`learning_rate` ->
  `optimizer.learning_rate`), else a key of the same block spelt alike
  (`data.imagesize` -> `data.image_size`), else the closest key anywhere;
  None if nothing is close.
  """
  known = sorted(known)
  parent, _, name = key.rpartition(".")
  same_name = [k for k in known if k.rpartition(".")[2] == name]
  if same_name:
    return same_name[0]
  siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
  close = difflib.get_close_matches(name, list(siblings), n=1)
  if close:
    return siblings[close[0]]
  close = difflib.get_close_matches(key, known, n=1)
  return close[0] if close else None


def value_at(config: Mapping[str, Any], dotted_key: str) -> Any:
  """`config`'s value at a dotted key, e.g. "optimizer.learning_rate"."""
  value = config
  for part in dotted_key.split("."):
    value = value[part]
  return value


def _check_keys(config, schema, prefix: str, where: str, known: set[str]) -> None:
  for key in config.keys():
    dotted = prefix + key
    if key not in schema:
      near = nearest_key(dotted, known)
      hint = f"did you mean config.{near}? " if near else ""
      raise ConfigError(f"{where} sets config.{dotted}, which is no config key; {hint}"
                        "Every key is in tlflax/defaults.py.")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], (ml_collections.ConfigDict, Mapping)):
        raise ConfigError(f"{where} sets config.{dotted}={config[key]!r}, but config.{dotted} is "
                          f"a block of settings ({', '.join(schema[key].keys())}): set those, "
                          f"e.g. config.{dotted}.{next(iter(schema[key].keys()))}.")
      _check_keys(config[key], schema[key], dotted + ".", where, known)
  missing = [key for key in schema.keys() if key not in config.keys()]
  if missing:
    raise ConfigError(f"{where} has no config.{prefix}{missing[0]}: start a config from "
                      "tlflax.defaults.base_config() and change what differs (see "
                      "configs/digits.py).")
