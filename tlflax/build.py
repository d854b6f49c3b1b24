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
  merged into freshly initialised variables: the new head (and, with
  `init.up_to_stage`, the stages after it) stay fresh, anything else that
  does not fit is an error naming it;
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tlflax import models, weights
from tlflax.tree import flatten, unflatten
from tlflax.weights import registry

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

  Example:
    >>> make_model(config, num_classes=5).stage_names
    ('stem', 'stage1', 'stage2', 'stage3')
  """
  fields = {"last_stage": config.model.last_stage} if config.model.last_stage else {}
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
  # A ViT's position embeddings are resampled to the configured image size.
  return weights.load(config.model.name, path, source=config.init.source or None,
                      **_image_size_field(config))


def _transferred(config, model, pretrained) -> tuple[dict[str, Any], list[str]]:
  """The part of `pretrained` a new task copies, and the regexes of what stays fresh."""
  if not config.init.keep_head:
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


def _check_kept_head(config, variables, pretrained) -> None:
  """`init.keep_head` keeps the pretrained head: it must have the task's shape."""
  want = flatten(variables).get("params/head/kernel")
  have = flatten(pretrained).get("params/head/kernel")
  if want is not None and (have is None or np.shape(have) != np.shape(want)):
    what = "no head" if have is None else f"a head of {np.shape(have)[-1]} classes"
    raise weights.WeightsError(
        f"config.init.keep_head=True keeps the pretrained head, but {config.init.weights} has "
        f"{what} and this task has {np.shape(want)[-1]}. Set config.init.keep_head=False "
        "for a new head.")


def build(config, num_classes: int | None, image_size: int | None = None,
          read_weights: bool = True) -> Built:
  """The model for a task with `num_classes` and the variables a run starts from.

  Args:
    config: a tlflax config (`config.model`, `config.init`, `config.seed`).
    num_classes: the task's classes (the new head); None for no head.
    image_size: input side to initialise at; `config.data.image_size` by default.
    read_weights: False skips `config.init.weights` (a run that resumes from
      its own checkpoint needs only the variables' structure).

  Returns:
    A `Built`; `start` is "scratch" when no weights were read.

  Example:
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
  if config.init.keep_head:
    _check_kept_head(config, variables, pretrained)
  pretrained, fresh = _transferred(config, model, pretrained)
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
