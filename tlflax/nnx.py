"""tlflax backbones inside Flax NNX models, frozen by the same rules as the linen path.

Any registered backbone (a linen `Backbone` from `tlflax.models.get_model`,
whatever its family) becomes an `nnx.Module` through `flax.nnx.bridge.ToNNX`,
holding the given variables, e.g. converted pretrained weights:

    >>> import tlflax.nnx
    >>> backbone = tlflax.nnx.to_nnx(model, variables, rngs=nnx.Rngs(dropout=0),
    ...                              freeze="depth:2")
    >>> optimizer = nnx.Optimizer(net, optax.sgd(0.01, momentum=0.9),
    ...                           wrt=tlflax.nnx.trainable_filter(net))
    >>> metrics = tlflax.nnx.train_step(net, optimizer, images, labels)

How linen's pieces map onto NNX (flax 0.12's bridge):

* `params` become `nnx.Param` and `batch_stats` become `nnx.BatchStat`
  variables, both at the linen module path: `linen/stage2/block1/bn1/scale`
  (a Param) sits beside `linen/stage2/block1/bn1/mean` (a BatchStat).
* `train=` is passed on to the linen model; in training `batch_stats` is made
  mutable, so the running statistics of trainable BatchNorm layers update in
  place, as the linen train step does.
* Every call draws a fresh key from each stream of the module's `nnx.Rngs`
  (linen's `dropout` rng, stochastic depth); the draw counter is module state,
  so `nnx.jit`-ted steps advance it too.

Freezing is declared as for the linen train loop (`tlflax.freeze`: a spec such
as "depth:2" or "linear_probe", or a `(regex, rule)` list over the backbone's
`/`-joined parameter paths). The rules decide three things here: the
backbone's frozen BatchNorm layers (its `frozen_batchnorm` field, so their
statistics never move, even under `train=True`), and through
`trainable_filter`, which parameters `nnx.Optimizer` keeps state for and which
ones `nnx.value_and_grad` differentiates (frozen ones get no gradient and no
update).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx import bridge

from tlflax import freeze as freeze_lib
from tlflax import steps, tree
from tlflax.models.base import Backbone
from tlflax.weights import merge

# The attribute of `NNXBackbone` that holds the bridged linen module; its
# variables live under this name (`linen/stem/conv/kernel`).
LINEN_ATTRIBUTE = "linen"

# The linen collections a backbone's variables may come in.
COLLECTIONS = ("params", "batch_stats")


class NNXBackbone(nnx.Module):
  """A tlflax backbone as an NNX module, with its freeze decisions attached.

  Build one with `to_nnx`, which checks the variables and the rules first.

  Attributes:
    linen: the `flax.nnx.bridge.ToNNX` wrapper holding the linen model and its
      variables (`nnx.Param` for `params`, `nnx.BatchStat` for
      `batch_stats`, at their linen module paths).
    frozen_paths: the backbone's frozen parameters as `/`-joined paths
      (`stem/conv/kernel`), as the freeze rules decided them.
    freezing_summary: the freeze rules' table (see `Freezing.summary`).
  """

  def __init__(self, model: Backbone, variables: Mapping[str, Any], rngs: nnx.Rngs,
               frozen_paths: Sequence[str], freezing_summary: str):
    """Wraps `model`; `to_nnx` is the checked way in (see there).

    Args:
      model: the linen backbone, its `frozen_batchnorm` already set.
      variables: `{"params": ..., "batch_stats": ...}` that fit `model`.
      rngs: the streams each call draws from (e.g. `dropout`).
      frozen_paths: the frozen parameters' `/`-joined paths.
      freezing_summary: the freeze table, kept for printing.
    """
    self.linen = bridge.ToNNX(model, rngs=rngs)
    # What ToNNX's lazy_init would store after a random init, filled with the
    # given values instead: no random initialisation, no sample input needed.
    for name, value in bridge.variables.linen_vars_to_nnx_attrs(variables).items():
      setattr(self.linen, name, nnx.data(value))
    self.frozen_paths = tuple(frozen_paths)
    self.freezing_summary = freezing_summary

  @property
  def model(self) -> Backbone:
    """The linen backbone (with the freeze rules' `frozen_batchnorm`)."""
    return self.linen.to_nnx__module

  @property
  def stage_names(self) -> tuple[str, ...]:
    return self.model.stage_names

  def __call__(self, x, train: bool = False, rngs: nnx.Rngs | None = None):
    """Logits (or pooled features without a head), as `model.apply` gives them.

    Args:
      x: NHWC images (or the `input_stage` output).
      train: training mode: batch statistics in the BatchNorm layers that are
        not frozen (whose running statistics then update in this module) and
        dropout, drawing from the module's streams.
      rngs: streams to draw from instead of the module's own.

    Returns:
      The linen model's output.
    """
    # Outside a linen context ToNNX makes nothing mutable; training must
    # write the running statistics back.
    mutable = ["batch_stats"] if train else False
    return self.linen(x, train=train, rngs=rngs, mutable=mutable)

  def variables(self) -> dict[str, Any]:
    """The current `{"params": ..., "batch_stats": ...}`, as the linen model takes them.

    Examples:
      >>> logits = backbone.model.apply(backbone.variables(), images)
    """
    flat = {}
    for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
      state = nnx.to_pure_dict(nnx.state(self.linen, kind))
      flat.update({f"{collection}/{path}": value
                   for path, value in tree.flatten(state).items()})
    return tree.unflatten(flat)


def to_nnx(model: Backbone, variables: Mapping[str, Any], rngs: nnx.Rngs | int | None = None,
           freeze: str | freeze_lib.FreezeRules | freeze_lib.Freezing = "full",
           batchnorm_mode: str = "frozen_layers") -> NNXBackbone:
  """A linen backbone and its variables as an NNX module, with freeze rules applied.

  Args:
    model: a backbone from `tlflax.models.get_model` (any family).
    variables: exactly `model`'s `{"params", "batch_stats"}`: from
      `tlflax.weights.load` when the head fits, or from
      `tlflax.weights.merge_pretrained(model.init(...), pretrained)` for a new
      head (which also reports what was loaded and what re-initialised).
    rngs: the streams each call draws from; an int seeds a `dropout` stream.
      Default: `nnx.Rngs(dropout=0)`.
    freeze: a `tlflax.freeze.rules_from_spec` spec ("full", "depth:2",
      "linear_probe", "surgical:stage3", "batchnorm"), a `(regex, rule)` list
      over the backbone's parameter paths, or a compiled `Freezing`. Rules
      must say "frozen" or "trainable": learning-rate multipliers ("lld:",
      "backbone_lr:") are refused, as an NNX optimizer takes one filter.
    batchnorm_mode: as in `tlflax.freeze.compile_rules`: "frozen_layers"
      (frozen layers' BatchNorm keeps its statistics), "all" or "none".

  Returns:
    An `NNXBackbone`; use it as a submodule of your own `nnx.Module` and give
    `trainable_filter(your_module)` to `nnx.Optimizer`.

  Raises:
    WeightsError: the variables do not fit `model` (the message names the
      missing, unexpected and misshapen keys).
    ValueError: bad freeze rules (unmatched parameters, rules that decide
      nothing, learning-rate multipliers).

  Examples:
    >>> model = tlflax.get_model("resnet18", num_classes=10)
    >>> pretrained = tlflax.weights.load("resnet18", "resnet18-f37072fd.pth", "torchvision")
    >>> variables, report = tlflax.merge_pretrained(
    ...     model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))), pretrained)
    >>> backbone = to_nnx(model, variables, rngs=nnx.Rngs(dropout=0), freeze="depth:2")
    >>> backbone(images).shape
    (8, 10)
  """
  variables = _checked_variables(model, variables)
  freezing = _compile_freezing(model, variables, freeze, batchnorm_mode)
  model = model.clone(frozen_batchnorm=freezing.frozen_batchnorm(variables.get("batch_stats", {})))
  if rngs is None or isinstance(rngs, int):
    rngs = nnx.Rngs(dropout=0 if rngs is None else rngs)
  return NNXBackbone(model, variables, rngs, freezing.frozen_paths, freezing.summary())


def _checked_variables(model: Backbone, variables: Mapping[str, Any]) -> dict[str, Any]:
  """`variables` as jax arrays, after checking they are exactly `model`'s."""
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise merge.WeightsError(
        f"Expected the model's variables {{'params': ..., 'batch_stats': ...}} (as "
        f"tlflax.weights.load returns them), got {type(variables).__name__} with keys "
        f"{list(variables) if isinstance(variables, Mapping) else '-'}.")
  # A model that reads a stage's output takes the full model's variables (the
  # skipped stages' are unused); their shapes come from the full model.
  full_model = model.clone(input_stage=None) if model.input_stage is not None else model
  problem = merge.describe_mismatch(tree.flatten(variables), merge.model_shapes(full_model),
                                    f"the {type(model).__name__} given to to_nnx")
  if problem:
    raise merge.WeightsError(
        problem + "\nFor a new head (another num_classes), merge first: variables, report = "
        "tlflax.merge_pretrained(model.init(key, images), pretrained).")
  return jax.tree.map(jnp.asarray, {c: variables[c] for c in COLLECTIONS if c in variables})


def _compile_freezing(model: Backbone, variables, freeze, batchnorm_mode) -> freeze_lib.Freezing:
  """The freeze rules compiled against the backbone's parameters."""
  if isinstance(freeze, freeze_lib.Freezing):
    freezing = freeze
    if set(freezing.path_multiplier) != set(tree.flatten(variables["params"])):
      raise ValueError("The Freezing was compiled for other parameters than this model's; "
                       "compile it with compile_rules(rules, variables['params']).")
  else:
    # The loop's policy: rules a user wrote must match, a spec string's need not.
    freezing = freeze_lib.compile_spec(freeze, variables["params"], model.stage_names,
                                       batchnorm_mode)
  scaled = sorted({m for m in freezing.path_multiplier.values() if m not in (0.0, 1.0)})
  if scaled:
    raise ValueError(
        f"Freeze rules with learning-rate multipliers {scaled} cannot be expressed as one "
        "nnx.Optimizer filter; use 'frozen' and 'trainable' rules here (e.g. 'depth:K', "
        "'linear_probe'), or tlflax's linen train loop for 'lld:' and 'backbone_lr:'.")
  return freezing


class _NotFrozen:
  """An NNX filter: true for every variable whose path is not a frozen parameter's.

  A class (not a lambda) so that two filters for the same paths are equal and
  hash alike: `nnx.jit` keys its cache on the optimizer's static filter.
  """

  def __init__(self, frozen: frozenset[tuple[str, ...]]):
    self.frozen = frozen

  def __call__(self, path, value) -> bool:
    del value
    return tuple(str(key) for key in path) not in self.frozen

  def __eq__(self, other):
    return isinstance(other, _NotFrozen) and other.frozen == self.frozen

  def __hash__(self):
    return hash(self.frozen)

  def __repr__(self):
    return f"NotFrozen({len(self.frozen)} frozen parameters)"


def trainable_filter(module: nnx.Module):
  """The NNX filter of `module`'s trainable parameters.

  Every `NNXBackbone` inside `module` (found wherever it sits) contributes its
  frozen parameters; everything else that is an `nnx.Param` (your own head,
  adapters) is trainable.

  Args:
    module: your model: an `NNXBackbone`, or a module with one or more inside.

  Returns:
    A filter for `nnx.Optimizer(..., wrt=)`, `nnx.state` and
    `nnx.DiffState(0, filter)` in `nnx.value_and_grad`.

  Raises:
    ValueError: `module` contains no `NNXBackbone`.

  Examples:
    >>> optimizer = nnx.Optimizer(net, optax.adamw(1e-3), wrt=trainable_filter(net))
    >>> nnx.state(net, trainable_filter(net))  # what is trained
  """
  frozen, found = set(), False
  for path, node in nnx.iter_graph(module):
    if isinstance(node, NNXBackbone):
      found = True
      prefix = tuple(str(key) for key in path) + (LINEN_ATTRIBUTE,)
      frozen.update(prefix + tuple(p.split("/")) for p in node.frozen_paths)
  if not found:
    raise ValueError(f"{type(module).__name__} holds no tlflax backbone; build one with "
                     "tlflax.nnx.to_nnx(model, variables, ...) and make it an attribute.")
  return nnx.All(nnx.Param, _NotFrozen(frozenset(frozen)))


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, images, labels) -> dict[str, Any]:
  """One optimizer step on softmax cross-entropy, differentiating trainable parameters only.

  The gradient is taken with respect to `optimizer.wrt` (give the optimizer
  `trainable_filter(model)`), so frozen parameters are constants of the loss:
  no gradient, no update, no optimizer state.

  Args:
    model: your module; called as `model(images, train=True)`, returning logits.
    optimizer: `nnx.Optimizer(model, tx, wrt=trainable_filter(model))`.
    images: a batch of NHWC images.
    labels: their integer classes.

  Returns:
    `{"loss", "accuracy", "grad_norm"}` (the norm over trainable gradients).

  Examples:
    >>> optimizer = nnx.Optimizer(net, optax.sgd(0.01, momentum=0.9),
    ...                           wrt=trainable_filter(net))
    >>> for images, labels in batches:
    ...   metrics = train_step(net, optimizer, images, labels)
  """
  def loss_fn(model):
    logits = model(images, train=True)
    return steps.cross_entropy(logits, labels), logits

  (loss, logits), grads = nnx.value_and_grad(
      loss_fn, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True)(model)
  optimizer.update(model, grads)
  return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
          "grad_norm": optax.tree.norm(nnx.to_pure_dict(grads))}
