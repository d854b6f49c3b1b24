"""What every backbone offers, declared once: named stages, truncation, head.

Freezing rules, feature extraction and the prefix cache work on any model
that implements `Backbone`; the families (`resnet`, `vgg`, `keras_resnet`)
implement it with the helpers here and never import each other's code.

A family implements the contract in three steps inside its `__call__`:

    check_stages(self)                      # last_stage / input_stage are valid
    for name in self.stage_names:
      if not runs_stage(self, name):        # replaced by the input (prefix cache)
        continue
      x = SomeStage(..., name=name)(x, train)
      layers.sow_feature(self, name, x)     # readable by `extract_features`
      if name == self.last_stage:
        break
    return classifier_head(self, pooled(x))   # sows "pre_logits", applies `head`
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlflax.models import layers
from tlflax.models.layers import PRE_LOGITS

# A submodule constructor handed to blocks (e.g. a `functools.partial` of Conv).
ModuleDef = Any

# The feature `extract_features` adds for a model with a head.
LOGITS = "logits"


@runtime_checkable
class Backbone(Protocol):
  """A linen module with named stages that can be truncated, resumed and headed.

  Every registered model (`tlflax.models.get_model`) is one. All members but
  `stage_names` are dataclass fields of the module, so
  `model.clone(last_stage="stage2", num_classes=None)` gives a variant whose
  variables are a subset of the original's, under the same names.

  Attributes:
    stage_names: the stages from input to output, each the name of a top-level
      submodule (its parameters live under `params/<stage>/...`) and of the
      feature it sows. ResNets: `("stem", "stage1", ..., "stageN")`; VGG:
      `("stage1", ..., "stage5", "fc")` (no stem; `fc` holds the hidden dense
      layers). The classifier `head` is *not* a stage.
    last_stage: truncate the network after this stage; the head (if any) then
      sits on that stage's output, globally average-pooled when it is a
      feature map (VGG's `fc` is already a vector). `None` (the
      default) runs the whole network. Any value that is not a stage name,
      the empty string included, is refused (`check_stages`): a config's
      `model.last_stage=""` means "not set" and is not passed on.
    input_stage: the model's input is this stage's output (e.g. read from the
      prefix cache): the stages up to and including it are skipped and the
      rest keep their parameter names, so the full model's variables apply.
      `None` (the default) takes images. Must come before `last_stage`.
    num_classes: size of the `head` Dense layer; `None` builds no head and the
      model returns the pooled `pre_logits` features.
    frozen_batchnorm: regular expressions, fully matched against BatchNorm
      module paths such as `"stage1/block2/bn1"`; a matching layer normalises
      with its running statistics and never updates them, even under
      `train=True` (see `layers.BatchNorm`).
    dtype: computation dtype (e.g. `jnp.bfloat16`); parameters stay float32
      and outputs leave in at least float32.
    head_init: how a new `head` starts: "lecun" (flax's default, LeCun
      normal kernel, zero bias) or "zeros" (kernel and bias zero, as
      big_transfer and big_vision start a transfer head: the first logits are
      all equal and the first gradients reach the head only).

  Calling the module, `model.apply(variables, x, train=False)` takes NHWC
  images (or the `input_stage` output) and returns logits (or `pre_logits`
  without a head), sowing every stage it runs and `PRE_LOGITS` into
  `intermediates/features` (see `extract_features`).

  Examples:
    >>> model = tlflax.models.get_model("resnet18", num_classes=10)
    >>> isinstance(model, Backbone)
    True
    >>> model.stage_names
    ('stem', 'stage1', 'stage2', 'stage3', 'stage4')
  """

  last_stage: Optional[str]
  input_stage: Optional[str]
  num_classes: Optional[int]
  frozen_batchnorm: tuple[str, ...]
  dtype: Any
  head_init: str

  @property
  def stage_names(self) -> tuple[str, ...]:
    """Stages from input to output, without the head."""

  def __call__(self, x, train: bool = False):
    """Logits, or the pooled features when `num_classes` is None."""

  def clone(self, **overrides) -> "Backbone":
    """The same module with some fields replaced (linen's `Module.clone`)."""


def numbered_stages(count: int) -> tuple[str, ...]:
  """`("stage1", ..., "stage<count>")`, the body stages every family numbers from 1.

  Examples:
    >>> ("stem",) + numbered_stages(4)
    ('stem', 'stage1', 'stage2', 'stage3', 'stage4')
  """
  return tuple(f"stage{i + 1}" for i in range(count))


def check_stages(module: Backbone) -> None:
  """Checks a model's `last_stage` and `input_stage` against its stage names.

  Args:
    module: a backbone (called at the start of its `__call__`).

  Raises:
    ValueError: a field names no stage (the message lists them), or
      `input_stage` does not come before `last_stage`.

  Examples:
    >>> check_stages(resnet18(last_stage="stage9"))
    ValueError: last_stage='stage9' is not a stage of this model; choose one of [...]
  """
  names = list(module.stage_names)
  for field, value in (("last_stage", module.last_stage),
                       ("input_stage", module.input_stage)):
    if value is not None and value not in names:
      raise ValueError(f"{field}={value!r} is not a stage of this model; "
                       f"choose one of {names}.")
  if (module.input_stage is not None and module.last_stage is not None
      and names.index(module.input_stage) >= names.index(module.last_stage)):
    raise ValueError(f"input_stage={module.input_stage!r} must come before "
                     f"last_stage={module.last_stage!r}: nothing would be left to run.")


def runs_stage(module: Backbone, name: str) -> bool:
  """False for the stages up to and including `input_stage`, which the input replaces.

  A model with `input_stage="stage2"` takes stage 2's output (e.g. from a
  prefix cache) and runs stage 3 onwards with the same parameter names, so
  the full model's variables apply unchanged.

  Args:
    module: a backbone.
    name: one of its `stage_names`.

  Returns:
    Whether the module computes stage `name` itself.
  """
  if module.input_stage is None:
    return True
  names = list(module.stage_names)
  return names.index(name) > names.index(module.input_stage)


def classifier_head(module: Backbone, pooled):
  """Sows the pre-logit features and applies the `head` layer if any.

  Args:
    module: the backbone being called (its `num_classes` and `dtype` decide).
    pooled: the (batch, features) vector the head sees.

  Returns:
    Logits, or `pooled` itself when `num_classes` is None; in float32, or in
    the computation dtype when that is wider (float64 parity tests).
  """
  layers.sow_feature(module, PRE_LOGITS, pooled)
  # Outputs leave at least in float32 (bfloat16 compute) and keep float64 when
  # the model computes in it (the exact parity tests).
  out_dtype = jnp.promote_types(module.dtype, jnp.float32)
  if module.num_classes is None:
    return pooled.astype(out_dtype)
  logits = nn.Dense(module.num_classes, dtype=module.dtype, name="head",
                    **head_initializers(module.head_init))(pooled)
  return logits.astype(out_dtype)


HEAD_INITS = ("lecun", "zeros")


def head_initializers(head_init: str) -> dict[str, Any]:
  """`nn.Dense` initializer arguments for a new head (see `Backbone.head_init`).

  Raises:
    ValueError: an unknown name; the message lists the choices.

  Examples:
    >>> head_initializers("zeros")["kernel_init"] is nn.initializers.zeros
    True
  """
  if head_init == "lecun":
    return {}
  if head_init == "zeros":
    return dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
  raise ValueError(f"head_init={head_init!r}: use one of {', '.join(HEAD_INITS)}.")


def feature_names(model: Backbone) -> list[str]:
  """The features `extract_features` can read from `model`, input side first.

  Args:
    model: a backbone from `tlflax.models.get_model`.

  Returns:
    Its stages up to `last_stage` (if truncated), then "pre_logits", then
    "logits" when it has a head.

  Raises:
    ValueError: `model.last_stage` or `model.input_stage` is no stage.

  Examples:
    >>> feature_names(get_model("cifar_resnet20"))
    ['stem', 'stage1', 'stage2', 'stage3', 'pre_logits', 'logits']
  """
  check_stages(model)
  stages = list(model.stage_names)
  if model.last_stage is not None:
    stages = stages[:stages.index(model.last_stage) + 1]
  names = stages + [PRE_LOGITS]
  if model.num_classes is not None:
    names.append(LOGITS)
  return names


def check_stage(model: Backbone, stage: str, model_name: str = "this model") -> None:
  """Raises a ValueError listing the choices if `model` has no feature `stage`.

  Args:
    model: a backbone.
    stage: a feature name, e.g. "stage3", "pre_logits" or "logits".
    model_name: how the message names the model, e.g. "'resnet18'".

  Raises:
    ValueError: `stage` is not in `feature_names(model)`; the message lists them.

  Examples:
    >>> check_stage(get_model("cifar_resnet20"), "stage7", "'cifar_resnet20'")
    ValueError: Unknown stage 'stage7' for 'cifar_resnet20'; choose one of stem, ...
  """
  names = feature_names(model)
  if stage not in names:
    extra = (" ('logits' needs weights with a classifier head)"
             if stage == LOGITS else "")
    raise ValueError(f"Unknown stage {stage!r} for {model_name}{extra}; choose one of "
                     f"{', '.join(names)} with --stage.")


def model_for_stage(model: Backbone, stage: str) -> Backbone:
  """`model` cut down to what computing `stage` needs.

  A body stage gets `last_stage=stage` and no head, so the stages after it
  are never run; "pre_logits" drops the head; "logits" keeps the model.

  Args:
    model: a backbone from `tlflax.models.get_model`.
    stage: one of `feature_names(model)`.

  Returns:
    A backbone whose variables are a subset of `model`'s, under the same names.

  Examples:
    >>> truncated = model_for_stage(get_model("resnet18"), "stage2")
    >>> truncated.last_stage, truncated.num_classes
    ('stage2', None)
  """
  check_stage(model, stage)
  if stage == LOGITS:
    return model
  if stage == PRE_LOGITS:
    return model.clone(num_classes=None)
  return model.clone(num_classes=None, last_stage=stage)


def extract_features(model: Backbone, variables, images,
                     names: Optional[Iterable[str]] = None) -> dict[str, jax.Array]:
  """Runs `model` in inference mode and returns the requested stage outputs.

  Args:
    model: a backbone from `get_model`.
    variables: its `{"params", "batch_stats"}`.
    images: NHWC batch.
    names: stage names (e.g. "stage2") and/or "pre_logits"; all by default.

  Returns:
    `{name: array}`, plus "logits" when the model has a head.

  Raises:
    ValueError: a requested name is not produced; the message lists those that are.

  Examples:
    >>> features = extract_features(model, variables, images, ["stage2", "pre_logits"])
  """
  logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  captured = dict(state["intermediates"]["features"])
  if model.num_classes is not None:
    captured[LOGITS] = logits
  if names is None:
    return captured
  names = list(names)
  missing = [n for n in names if n not in captured]
  if missing:
    raise ValueError(f"{missing} not produced by this model; available: {sorted(captured)}.")
  return {n: captured[n] for n in names}
