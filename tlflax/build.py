"""From a config to a model and its starting variables: the one builder every tool uses.

    built = build.build(config, num_classes=10)
    built.model, built.variables, built.start      # start: "pretrained" or "scratch"

Training (`tlflax.training`), feature extraction (`tlflax.inference.features`)
and every sweep go through here, so a config means the same network and the
same starting weights wherever it is used:

* the model is `config.model` (name, dtype, last_stage) with the head the
  task needs;
* the weights are `config.init` (a weight file, a tlflax checkpoint, a known
  pretrained id, or with `init.source="workdir"` another run's final state),
  merged into freshly initialised variables: the head is kept when it
  predicts the task's classes (the same names in the same order: a run that
  continues another) and is new otherwise (`init.keep_head` decides it
  explicitly; the log says which and why); with `init.up_to_stage`, the
  stages after it stay fresh too; anything else that does not fit is an
  error naming it;
* without `init.weights`, the variables are `model.init` at `config.seed`.

Resuming from a checkpoint comes before all this (see `tlflax.training`): a
resumed run restores its own state and reads no pretrained weights.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tlflax import defaults, models, weights
from tlflax.data import images
from tlflax.tree import flatten, unflatten
from tlflax.weights import native, registry

log = logging.getLogger(__name__)

HEAD_RULE = r"(params|batch_stats)/head(/.*)?"


@dataclasses.dataclass(frozen=True)
class Built:
  """A model and the variables a run starts from.

  Attributes:
    model: the linen module.
    variables: `{"params", "batch_stats"}` as numpy arrays (host memory).
    start: "pretrained" (from `config.init.weights`) or "scratch".
    report: what the merge did (None from scratch).
  """
  model: Any
  variables: Any
  start: str
  report: weights.MergeReport | None = None


def make_model(config, **options):
  """`config.model` as a module; `options` (e.g. `num_classes`) override its fields.

  `config.model.options` ("transform_input=False, ...") sets the model's
  other fields (see `tlflax.defaults.model_options`).

  Examples:
    >>> make_model(config, num_classes=5).stage_names
    ('stem', 'stage1', 'stage2', 'stage3')
  """
  fields = defaults.model_options(config)
  if config.model.last_stage:
    fields["last_stage"] = config.model.last_stage
  head_init = config.model.get("head_init", "lecun")
  if head_init != "lecun":
    fields["head_init"] = head_init
  fields.update(_image_size_field(config))
  return models.get_model(config.model.name, dtype=config.model.dtype, **{**fields, **options})


def _image_size_field(config) -> dict[str, int]:
  """`{"image_size": config.data.image_size}` for a model with that field (a ViT), else {}.

  A ViT stores its position embeddings for one image size; building it for
  the configured size (and resampling pretrained embeddings to it, see
  `read_pretrained`) makes a config with another image size just work.
  """
  if not hasattr(models.get_model(config.model.name), "image_size"):
    return {}
  return {"image_size": int(config.data.image_size)}


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_variables(model, seed: int, image_shape: tuple[int, ...]):
  """`model.init` for one image, compiled once per (model, shape) in a process.

  A sweep builds the same model many times; equal modules hash equal, so only
  the first run pays for compiling the initialisation.
  """
  return model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)))


def _weights_preprocessing(config):
  """The preprocessing `config.init.weights` was published or trained with, and its name.

  Returns:
    (Preprocessing, where it comes from), or (None, "") when the weights say
    nothing about their input (no weights, or a file no registry entry knows).
  """
  reference, source = config.init.weights, config.init.source
  if not reference:
    return None, ""
  if source == "workdir":
    from tlflax.training import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
    if workdir_lib.is_training_workdir(reference):
      data = workdir_lib.read_config(reference)["data"]
      size = int(data["image_size"])
      if data.get("mean") and data.get("std"):
        return (images.Preprocessing(crop_size=size, resize_size=max(size, int(data["resize_size"])),
                                     mean=tuple(data["mean"]), std=tuple(data["std"])),
                f"the run {reference}")
    return None, ""
  if os.path.isdir(reference) and native.is_checkpoint(reference):
    recorded = native.read_provenance(reference).get("preprocessing")
    if recorded:
      return images.Preprocessing(**recorded), f"the tlflax checkpoint {reference}"
    return None, ""
  if not os.path.exists(reference) and registry.is_known(reference):
    entry = registry.get(reference)
    return entry.preprocessing, f"{entry.id}'s published preprocessing"
  if os.path.isfile(reference):
    entry = registry.matching_entry(config.model.name, reference)
    if entry is not None:
      return entry.preprocessing, f"{entry.id}'s published preprocessing (the file is {entry.id}'s)"
  return None, ""


def with_data_normalization(config):
  """`config` with `data.mean` and `data.std` filled in where they are unset (`()`).

  Unset, they are the pixel scaling the starting weights expect: a
  pretrained id's published preprocessing (Google's (x - 127) / 128 for
  `efficientnet_lite0.tf_in1k`, ImageNet's mean and std for torchvision's),
  the preprocessing a tlflax checkpoint records, or the run that
  `init.source="workdir"` continues; else ImageNet's mean and std. Values
  the config sets are kept as they are. The log says which were used.

  Raises:
    ConfigError: unset values for weights that expect BGR pixels (Caffe-style
      Keras weights), which the training pipeline does not produce.

  Returns:
    A copy of `config` (the argument itself when both are set).
  """
  data = config.data
  if len(data.mean) and len(data.std):
    return config
  preprocessing, origin = _weights_preprocessing(config)
  if preprocessing is None:
    preprocessing, origin = images.Preprocessing(), "ImageNet's (the weights record none)"
  if preprocessing.channel_order != "RGB":
    raise defaults.ConfigError(
        f"{config.init.weights} expects {preprocessing.channel_order} pixels (from {origin}), "
        "which training cannot produce; set config.data.mean and config.data.std (on the "
        "[0, 1] scale, RGB) to train from these weights anyway.")
  scale = float(preprocessing.value_range)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if not len(data.mean):
      config.data.mean = tuple(m / scale for m in preprocessing.mean)
    if not len(data.std):
      config.data.std = tuple(s / scale for s in preprocessing.std)
  log.info("Pixels scaled as (x / 255 - mean) / std with mean %s, std %s: %s.",
           _rounded(config.data.mean), _rounded(config.data.std),
           origin if not (len(data.mean) or len(data.std)) else f"unset ones from {origin}")
  return config


def _rounded(values) -> str:
  return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def read_pretrained(config) -> dict[str, Any] | None:
  """The variables `config.init.weights` names, or None when it is empty.

  Args:
    config: a tlflax config. `init.source="workdir"` reads a training run's
      final `{"params", "batch_stats"}`; any other source goes through
      `tlflax.weights.load` (a file, a tlflax checkpoint, a known id).

  Raises:
    WeightsError, CheckpointError: missing or unusable weights, saying what
      to pass instead.
  """
  path = config.init.weights
  if not path:
    return None
  if config.init.source == "workdir":
    from tlflax.training import checkpoint  # pylint: disable=import-outside-toplevel
    try:
      return checkpoint.restore_params_only(path)
    except checkpoint.CheckpointError as e:
      raise checkpoint.CheckpointError(
          f"With config.init.source='workdir', config.init.weights must be a training "
          f"run's workdir: {e}") from e
  if not os.path.exists(path) and not registry.is_known(path):
    raise weights.WeightsError(
        f"Weight file {path!r} does not exist and is no known pretrained id. Pass an "
        "existing file or tlflax checkpoint with --config.init.weights=PATH (and "
        "--config.init.source=torchvision|timm|keras|tlflax), a training run with "
        "--config.init.source=workdir, or an id from tlflax.weights.registry.list_ids().")
  _check_recorded_options(config)
  # A ViT's position embeddings are resampled to the configured image size.
  return weights.load(config.model.name, path, source=config.init.source or None,
                      **_image_size_field(config))


def _check_recorded_options(config) -> None:
  """A tlflax checkpoint's recorded model options must be what the config builds.

  `tlflax convert --model_option` records the settings the weights need (e.g.
  an inception_v3 trained without transform_input); a run that builds the
  network otherwise would train it on differently scaled inputs, silently.

  Raises:
    WeightsError: naming the option, both values, and the setting to use.
  """
  path = config.init.weights
  if config.init.source not in ("", "tlflax") or not native.is_checkpoint(path):
    return
  model = make_model(config)
  for key, value in native.model_options(native.read_provenance(path)).items():
    if hasattr(model, key) and getattr(model, key) != value:
      raise weights.WeightsError(
          f"{path} was converted for {config.model.name} with {key}={value!r}, but the "
          f"config builds it with {key}={getattr(model, key)!r}. Add {key}={value!r} to "
          "config.model.options (--config.model.options=\"" f"{key}={value!r}\").")


def _transferred(config, model, pretrained, keep_head: bool
                 ) -> tuple[dict[str, Any], list[str]]:
  """The part of `pretrained` a new task copies, and the regexes of what stays fresh."""
  if not keep_head:
    # A new task gets a new head, even when the old one has the same shape.
    pretrained = {collection: {k: v for k, v in tree.items() if k != "head"}
                  for collection, tree in pretrained.items()}
  if not config.init.up_to_stage:
    return pretrained, [HEAD_RULE]
  # Copy the first stages only (the transfer experiments of Yosinski et al.).
  names = list(model.stage_names)
  if config.init.up_to_stage not in names:
    raise ValueError(f"init.up_to_stage={config.init.up_to_stage!r} is not a stage of "
                     f"{config.model.name}; choose one of {names}.")
  copied = set(names[:names.index(config.init.up_to_stage) + 1])
  pretrained = {collection: {k: v for k, v in tree.items() if k in copied}
                for collection, tree in pretrained.items()}
  return pretrained, [rf"(params|batch_stats)/{re.escape(k)}(/.*)?" for k in names
                      if k not in copied] + [HEAD_RULE]


def source_class_names(config) -> list[str] | None:
  """The classes the head of `config.init.weights` predicts, in order, where that is known.

  A training run records them (`class_names.json`, found also from its
  checkpoints, one step's or a finished stage's directory); a tlflax
  checkpoint in its provenance; a pretrained id, or a file the registry knows
  by its name, in its registry entry. Other weight files (a torchvision .pth
  saved by hand, say) carry none.

  Returns:
    The class names, or None when the weights do not say.

  Examples:
    >>> config.init.weights, config.init.source = "workdirs/digits", "workdir"
    >>> source_class_names(config)
    ['0', '1', '2', '3', '4']
  """
  path = config.init.weights
  if not path:
    return None
  if config.init.source == "workdir":
    from tlflax.training import workdir  # pylint: disable=import-outside-toplevel
    return workdir.recorded_class_names(path)
  if os.path.isfile(os.path.join(path, native.PROVENANCE_FILE)):
    names = native.read_provenance(path).get("class_names")
  elif registry.is_known(path) and not os.path.exists(path):
    names = registry.get(path).class_names
  else:
    entry = registry.matching_entry(config.model.name, path)
    names = entry.class_names if entry else None
  if isinstance(names, str):  # the key of a class list shipped with tlflax
    names = registry.class_names(names)
  return [str(name) for name in names] if names else None


def _listed(names: Sequence[str], limit: int = 12) -> str:
  """Class names for a message: `a, b, c` (long lists cut, with their length)."""
  if len(names) <= limit:
    return ", ".join(names)
  return f"{', '.join(names[:limit])}, ... ({len(names)} in all)"


def _keeps_head(config, variables, pretrained, class_names: Sequence[str] | None) -> bool:
  """Whether the run keeps the head of `config.init.weights`; the reason is logged.

  `config.init.keep_head`: True keeps it (it must have the task's shape), False
  never does, and None (the default) keeps it when it predicts this task's
  classes: the same class names in the same order, as when a run continues
  from another run of the same task. A head of another shape, of classes that
  are none of this task's, or of unknown classes, is re-initialised. A head of
  as many classes, some or all of them this task's but not in this task's
  order, is an error: only the user knows which of the two is meant.

  Raises:
    WeightsError: keep_head=True and the head does not fit; or the ambiguous
      case above (listing both sets of classes).
  """
  keep = config.init.keep_head
  if keep is not None and not isinstance(keep, (bool, np.bool_)):
    raise ValueError(f"config.init.keep_head={keep!r}: use True (keep the pretrained head), "
                     "False (a new head), or leave it unset to keep the head when its classes "
                     "are this task's.")
  want = flatten(variables).get("params/head/kernel")
  if want is None:  # the task's network has no head (num_classes=None)
    return False
  have = flatten(pretrained).get("params/head/kernel")
  source = config.init.weights
  if keep is not None and not keep:
    log.info("New head: config.init.keep_head=False.")
    return False
  if keep:
    _check_kept_head(config, want, have)
    log.info("Kept the head of %s (config.init.keep_head=True).", source)
    return True
  # keep_head unset: keep the head only when it is this task's.
  if config.init.up_to_stage:
    log.info("New head: init.up_to_stage=%r copies the network up to that stage only.",
             config.init.up_to_stage)
    return False
  if have is None:
    log.info("New head: %s has no head.", source)
    return False
  if np.shape(have)[-1] != np.shape(want)[-1]:
    log.info("New head: the source's head has %d classes, this task %d.", np.shape(have)[-1],
             np.shape(want)[-1])
    return False
  if np.shape(have) != np.shape(want):
    log.info("New head: the source's head takes %d features, this network's %d.",
             np.shape(have)[0], np.shape(want)[0])
    return False
  source_names = source_class_names(config)
  task_names = None if class_names is None else [str(name) for name in class_names]
  if source_names is None or task_names is None:
    whose = f"{source} records" if source_names is None else "this task has"
    log.info("New head: %s no class names to match the head's %d classes with; "
             "config.init.keep_head=True keeps it.", whose, np.shape(want)[-1])
    return False
  if source_names == task_names:
    log.info("Kept the head of %s (classes %s).", source, _listed(source_names))
    return True
  if not set(source_names) & set(task_names):
    log.info("New head: the source's classes (%s) are not this task's (%s).",
             _listed(source_names), _listed(task_names))
    return False
  how = ("the same classes in another order" if sorted(source_names) == sorted(task_names)
         else f"{len(source_names)} classes, some of them this task's")
  raise weights.WeightsError(
      f"The head of {source} predicts {how}: its classes are {_listed(source_names)}; "
      f"this task's are {_listed(task_names)}. Set --config.init.keep_head=False for a new "
      "head, or --config.init.keep_head=True to keep this head as it is (its outputs keep "
      "the source's order).")


def _check_kept_head(config, want, have) -> None:
  """`init.keep_head=True` keeps the pretrained head: it must have the task's shape."""
  if have is None or np.shape(have) != np.shape(want):
    what = "no head" if have is None else f"a head of {np.shape(have)[-1]} classes"
    raise weights.WeightsError(
        f"config.init.keep_head=True keeps the pretrained head, but {config.init.weights} has "
        f"{what} and this task has {np.shape(want)[-1]}. Set config.init.keep_head=False "
        "for a new head.")

def build(config, num_classes: int | None, image_size: int | None = None,
          read_weights: bool = True, class_names: Sequence[str] | None = None) -> Built:
  """The model for a task with `num_classes` and the variables a run starts from.

  Args:
    config: a tlflax config (`config.model`, `config.init`, `config.seed`).
    num_classes: the task's classes (the new head); None for no head.
    image_size: input side to initialise at; `config.data.image_size` by default.
    read_weights: False skips `config.init.weights` (a run that resumes from
      its own checkpoint needs only the variables' structure).
    class_names: the task's classes in label order. With `init.keep_head`
      unset, the pretrained head is kept when it predicts exactly these
      (see `_keeps_head`); without them, the head is new.

  Returns:
    A `Built`; `start` is "scratch" when no weights were read.

  Examples:
    >>> built = build(config, num_classes=5)
    >>> built.start, sorted(built.variables)
    ('pretrained', ['batch_stats', 'params'])
  """
  model = make_model(config, num_classes=num_classes)
  if config.init.up_to_stage and config.init.up_to_stage not in model.stage_names:
    # Checked before any weights are read (or downloaded).
    raise ValueError(f"init.up_to_stage={config.init.up_to_stage!r} is not a stage of "
                     f"{config.model.name}; choose one of {list(model.stage_names)}.")
  size = image_size or int(config.data.image_size)
  variables = jax.tree.map(np.asarray, init_variables(model, int(config.seed), (size, size, 3)))
  pretrained = read_pretrained(config) if read_weights else None
  if pretrained is None:
    return Built(model, variables, "scratch")
  keep_head = _keeps_head(config, variables, pretrained, class_names)
  pretrained, fresh = _transferred(config, model, pretrained, keep_head)
  variables, report = weights.merge_pretrained(variables, pretrained, reinit=fresh)
  log.info("Pretrained weights %s: %s", config.init.weights, report)
  return Built(model, jax.tree.map(np.asarray, variables), "pretrained", report)


def build_extractor(config, stage: str, image_size: int | None = None) -> Built:
  """The configured network and weights, cut down to what computing `stage` needs.

  The head is kept only for `stage="logits"`, with the weights' own number of
  classes; a body stage truncates the network there, so nothing after it runs.
  Every variable comes from the weights (none is re-initialised); without
  `config.init.weights` the network is randomly initialised (a baseline).

  Args:
    config: a tlflax config.
    stage: one of `tlflax.models.feature_names(model)`, e.g. "stage3".
    image_size: input side; `config.data.image_size` by default.

  Returns:
    A `Built` whose model computes `stage`.

  Raises:
    ValueError: an unknown stage (checked before any weights are read; the
      message lists the model's stages).
    WeightsError, CheckpointError: weights that cannot be read.
  """
  name = config.model.name
  size = image_size or int(config.data.image_size)
  models.check_stage(make_model(config), stage, repr(name))
  pretrained = read_pretrained(config)
  if pretrained is None:
    # Without weights the constructor's default head stays (a random baseline).
    log.warning("No config.init.weights: features of a randomly initialised %s (seed %d).",
                name, config.seed)
    full_model = make_model(config)
  else:
    head = flatten(pretrained).get("params/head/kernel")
    full_model = make_model(config, num_classes=None if head is None else int(np.shape(head)[-1]))
  models.check_stage(full_model, stage, repr(name))
  model = models.model_for_stage(full_model, stage)
  if pretrained is None:
    variables = init_variables(model, int(config.seed), (size, size, 3))
    return Built(model, jax.tree.map(np.asarray, variables), "scratch")
  # Traced for its shapes, not initialised (compiling init's random draws
  # takes seconds); the stages after `stage` are left out of the file's tree.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  template = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
  needed = flatten(template).keys()
  used = unflatten({k: v for k, v in flatten(pretrained).items() if k in needed})
  variables, report = weights.merge_pretrained(template, used, reinit=())
  log.info("Weights %s: %s", config.init.weights, report)
  return Built(model, jax.tree.map(np.asarray, variables), "pretrained", report)
