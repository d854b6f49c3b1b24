"""Staged fine-tuning: a run as a sequence of stages with their own freezing and rates.

A config may list `stages`; each is a dict:

    {"name": "head", "epochs": 2, "freeze": "linear_probe", "learning_rate": 0.1}
    {"name": "all", "steps": 500, "freeze": "none", "learning_rate": 0.01,
     "schedule": "cosine", "warmup_steps": 50, "reset_optimizer": False}

Keys: `name`, the length as `steps` or `epochs`, `freeze` (a spec of
`tlflax.freeze.rules_from_spec` or a list of `(regex, rule)`), and optimizer
settings (`learning_rate`, `schedule`, `warmup_steps`, `weight_decay`, or any
key of the `optimizer` block under `optimizer`); anything not given comes from
the config's `optimizer` block. Each stage's schedule runs over that stage.

The step counter is global and the stages tile it, so "which stage" is a
function of the step alone: a resumed run rebuilds the freezing and optimizer
of the stage its checkpoint was written in. Between stages the parameters and
BatchNorm statistics carry over; optimizer state carries over for parameters
trainable in both stages (unless the new stage has `reset_optimizer`) and
starts fresh for newly unfrozen ones (`carry_optimizer_state`).

Built-in recipes build such lists: `lp_ft` (linear probe, then fine-tune
everything), `gradual_unfreezing` (one more stage per phase, from the head
down, as in ULMFiT) and `delayed_backbone` (the backbone joins at a chosen
epoch at a lower rate). `config.recipe` names one of them instead of a list
(`--config.recipe=lp_ft` on the command line): `recipe_stages` builds its
stages over the run's length, with the `recipe_*` keys of
`tlflax.defaults.base_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import optax

from tlflax import defaults, optim
from tlflax.defaults import ConfigError, Range
from tlflax.freeze import Freezing
from tlflax.tree import flatten

OPTIMIZER_SHORTCUTS = ("learning_rate", "schedule", "warmup_steps", "weight_decay")
STAGE_KEYS = ("name", "steps", "epochs", "freeze", "optimizer", "reset_optimizer",
              *OPTIMIZER_SHORTCUTS)
STAGE_LENGTHS = {"steps": Range("the stage's length in steps", 1, whole=True),
                 "epochs": Range("the stage's length in epochs", 0, minimum_allowed=False)}
RECIPES = ("lp_ft", "gradual_unfreezing", "delayed_backbone")  # the names config.recipe takes


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a run: global steps `start` ... `end - 1`.

  Attributes:
    name: used in logs, checkpoints and `WORKDIR/stages/<name>`.
    index: position in the run (0-based).
    start, end: the global steps the stage covers, end exclusive.
    freeze: the freeze spec (string or rule list).
    optimizer: the full optimizer config of the stage.
    reset_optimizer: start with fresh optimizer state even for parameters
      that were trainable in the previous stage.
  """
  name: str
  index: int
  start: int
  end: int
  freeze: Any
  optimizer: ml_collections.ConfigDict
  reset_optimizer: bool = False

  @property
  def num_steps(self) -> int:
    return self.end - self.start


def plan(config, steps_per_epoch: int, total_steps: int,
         stage_names: Sequence[str] = ()) -> list[Stage]:
  """The stages of a run.

  Args:
    config: the run config; `config.stages` lists the stages, or
      `config.recipe` names a recipe, and without either the run is one stage
      (`config.freeze.rules`, `config.optimizer`).
    steps_per_epoch: to convert `epochs` into steps.
    total_steps: the length of a run without `stages` (a recipe's length).
    stage_names: the model's stages (`model.stage_names`), which
      `gradual_unfreezing` unfreezes one by one.

  Returns:
    The stages in order, tiling steps 0 ... end of the last one.

  Raises:
    ConfigError: a stage or recipe that cannot run (see `check_stages`), or
      a stage shorter than one step.
  """
  check_stages(config)
  if config.get("recipe"):
    specs = recipe_stages(config, total_steps, stage_names)
  else:
    specs = config.get("stages") or ()
  if not specs:
    return [Stage("train", 0, 0, total_steps, config.freeze.rules,
                  ml_collections.ConfigDict(config.optimizer.to_dict()))]
  stages, start = [], 0
  for index, spec in enumerate(specs):
    spec = dict(spec)
    where = _stage_label(index, spec)
    name = spec.get("name") or f"stage{index}"
    length = (int(spec["steps"]) if "steps" in spec
              else int(round(float(spec["epochs"]) * steps_per_epoch)))
    if length < 1:
      raise ConfigError(f"{where} is {length} steps long ({spec['epochs']} epochs of "
                        f"{steps_per_epoch} steps); give it at least one step.")
    stage_optimizer = ml_collections.ConfigDict(config.optimizer.to_dict())
    stage_optimizer.update(_optimizer_overrides(spec))
    stages.append(Stage(name, index, start, start + length,
                        spec.get("freeze", config.freeze.rules), stage_optimizer,
                        bool(spec.get("reset_optimizer", False))))
    start += length
  return stages


def check_stages(config) -> None:
  """Raises ConfigError for stages that cannot run, before any data is read.

  Checks `config.stages` (a list of dicts with known keys, each with one
  length, unique names, optimizer settings the `optimizer` block has, in
  their ranges) and `config.recipe` (a known recipe, not set together with
  `config.stages` or `config.freeze.rules`). `plan` checks what needs the
  data: a length in epochs that comes to less than one step.

  Args:
    config: the run config.
  """
  recipe = config.get("recipe") or ""
  specs = config.get("stages") or ()
  if recipe:
    if recipe not in RECIPES:
      near = defaults.nearest_key(recipe, RECIPES)
      hint = f"did you mean {near!r}? " if near else ""
      raise ConfigError(f"config.recipe={recipe!r} is no recipe; {hint}Use one of "
                        f"{', '.join(RECIPES)}, or '' for none.")
    if specs:
      raise ConfigError(f"config.recipe={recipe!r} and config.stages both set the stages; "
                        "set only one of them.")
    if config.freeze.rules not in ("none", "full"):
      raise ConfigError(f"config.recipe={recipe!r} sets each stage's freezing itself, so "
                        f"config.freeze.rules={config.freeze.rules!r} would be ignored; leave "
                        "it at 'none', or write the stages in config.stages.")
  names = set()
  for index, spec in enumerate(specs):
    if not isinstance(spec, (Mapping, ml_collections.ConfigDict)):
      raise ConfigError(f"config.stages[{index}] is {spec!r}; a stage is a dict such as "
                        "{'name': 'head', 'epochs': 2, 'freeze': 'linear_probe'}.")
    spec = dict(spec)
    where = _stage_label(index, spec)
    for key in spec:
      if key not in STAGE_KEYS:
        near = defaults.nearest_key(key, STAGE_KEYS)
        if near:
          hint = f"did you mean {near!r}?"
        elif key in optim.default_config():
          hint = f"optimizer settings go under 'optimizer', e.g. {{'optimizer': {{{key!r}: ...}}}}."
        else:
          hint = f"a stage takes {', '.join(STAGE_KEYS)}."
        raise ConfigError(f"{where} has unknown key {key!r}; {hint}")
    name = spec.get("name") or f"stage{index}"
    if not isinstance(name, str) or name in names or "/" in name:
      raise ConfigError(f"{where}: stage names must be unique strings without '/'.")
    names.add(name)
    if ("steps" in spec) == ("epochs" in spec):
      raise ConfigError(f"{where} needs exactly one of 'steps' or 'epochs'.")
    for key, length in STAGE_LENGTHS.items():
      if key in spec:
        length.check(f"{where}: {key}", spec[key], key)
    if not isinstance(spec.get("optimizer") or {}, (Mapping, ml_collections.ConfigDict)):
      raise ConfigError(f"{where}: 'optimizer' is {spec['optimizer']!r}; give it a dict of "
                        "settings of the optimizer block, e.g. {'name': 'adamw'}.")
    _optimizer_overrides(spec, where)


def _stage_label(index: int, spec: Mapping[str, Any]) -> str:
  return f"Stage {index} ({spec.get('name', 'unnamed')!r})"


def _optimizer_overrides(spec: Mapping[str, Any], where: str = "") -> dict[str, Any]:
  """A stage's optimizer settings (`optimizer` and the shortcuts), checked."""
  overrides = dict(spec.get("optimizer") or {})
  overrides.update({k: spec[k] for k in OPTIMIZER_SHORTCUTS if k in spec})
  known = optim.default_config()
  for key, value in overrides.items():
    if key not in known:
      near = defaults.nearest_key(key, known.keys())
      hint = f"did you mean {near!r}? " if near else ""
      raise ConfigError(f"{where} sets unknown optimizer key {key!r}; {hint}"
                        f"known: {', '.join(sorted(known))}.")
    value_range = defaults.VALUE_RANGES.get(f"optimizer.{key}")
    if value_range is not None:
      value_range.check(f"{where}: {key}", value, key)
  return overrides


def recipe_stages(config, total_steps: int, stage_names: Sequence[str] = ()
                  ) -> list[dict[str, Any]]:
  """The stages of the recipe `config.recipe`, over a run of `total_steps` steps.

  The run keeps its length (`num_train_steps`, else `num_epochs`) and its
  rate (`optimizer.learning_rate`); the recipe splits them:

  * lp_ft: `recipe_head_fraction` of the steps train the head alone at
    `recipe_head_learning_rate` (0: the run's rate), the rest everything;
  * delayed_backbone: the head alone for `recipe_head_fraction` of the steps,
    then the backbone too, at `recipe_backbone_multiplier` times the rate;
  * gradual_unfreezing: equal phases, the head first, then one more of the
    model's stages per phase, the last phase everything (the stem too).

  Args:
    config: the run config, with `recipe` set.
    total_steps: the run's length in steps.
    stage_names: the model's stages (`model.stage_names`); gradual_unfreezing
      needs them.

  Returns:
    A `config.stages` list (lengths in steps) of `total_steps` steps in all.

  Examples:
    >>> config.recipe = "lp_ft"; config.recipe_head_fraction = 0.5
    >>> recipe_stages(config, total_steps=6)
    [{'name': 'linear_probe', 'steps': 3, ...}, {'name': 'fine_tune', 'steps': 3, ...}]
  """
  recipe, rate = config.recipe, config.optimizer.learning_rate
  if recipe == "gradual_unfreezing":
    if not stage_names:
      raise ValueError("gradual_unfreezing needs the model's stage names (model.stage_names).")
    num_stages = len([s for s in stage_names if s != "stem"])
    phases = num_stages + 2
    if total_steps < phases:
      raise ConfigError(f"config.recipe='gradual_unfreezing' trains {phases} phases on this "
                        f"model, one step each at least, but the run has {total_steps} steps; "
                        "lengthen it (config.num_train_steps or config.num_epochs).")
    phase = total_steps // phases
    return gradual_unfreezing(num_stages, phase, rate, unit="steps",
                              final_length=total_steps - phase * (phases - 1))
  if total_steps < 2:
    raise ConfigError(f"config.recipe={recipe!r} trains two stages, one step each at least, "
                      f"but the run has {total_steps} step; lengthen it "
                      "(config.num_train_steps or config.num_epochs).")
  # The head's share, at least one step and leaving one for the second stage.
  head_steps = min(max(1, round(config.recipe_head_fraction * total_steps)), total_steps - 1)
  if recipe == "lp_ft":
    return lp_ft(head_steps, total_steps - head_steps, config.recipe_head_learning_rate or rate,
                 rate, unit="steps")
  return delayed_backbone(head_steps, total_steps, rate, config.recipe_backbone_multiplier,
                          unit="steps")


def stage_of_next_step(stages: Sequence[Stage], step: int) -> Stage:
  """The stage that takes step `step` (0-based), i.e. the step after a state at `step`."""
  for stage in stages:
    if stage.start <= step < stage.end:
      return stage
  return stages[-1]


def stage_of_state(stages: Sequence[Stage], step: int) -> Stage:
  """The stage whose optimizer a state that has taken `step` steps belongs to.

  A state at a stage boundary still belongs to the stage that ended there:
  its optimizer state has that stage's layout.
  """
  return stage_of_next_step(stages, max(step - 1, 0))


def carry_optimizer_state(old_state, old_freezing: Freezing, new_state,
                          new_freezing: Freezing, reset: bool = False):
  """The new stage's optimizer state, with what carries over from the old one.

  Per-parameter slots (momentum, Adam moments) are copied for parameters
  trainable in both stages, even when they move to another learning-rate
  group; newly unfrozen parameters keep the fresh (zero) slots. Schedule
  step counts start again: each stage's schedule runs over the stage. Other
  per-group counters (Adam's bias-correction count) take the largest count
  of the old groups that parameters of the group come from, or stay fresh
  when the group has only new parameters.

  Args:
    old_state: optimizer state at the end of the old stage.
    old_freezing: the old stage's freezing.
    new_state: `tx.init(trainable)` of the new stage's optimizer.
    new_freezing: the new stage's freezing.
    reset: keep `new_state` as it is (the stage's `reset_optimizer`).

  Returns:
    An optimizer state with the structure of `new_state`.
  """
  if reset:
    return new_state
  old_multiplier = old_freezing.path_multiplier
  old_labels = flatten(old_freezing.trainable_labels())
  new_labels = flatten(new_freezing.trainable_labels())
  # Which old groups feed each new group (parameters trainable in both).
  sources: dict[str, set[str]] = {}
  for path, label in new_labels.items():
    if path in old_labels:
      sources.setdefault(label, set()).add(old_labels[path])

  old_leaves = {_slot_key(path, old_labels): leaf
                for path, leaf in _leaves_with_paths(old_state)}
  new_leaves, treedef = jax.tree_util.tree_flatten_with_path(new_state, is_leaf=_is_schedule)
  carried = []
  for path, leaf in new_leaves:
    group, slot, parameter = _slot_key(path, new_labels)
    value = leaf
    if isinstance(leaf, optax.ScaleByScheduleState):
      pass  # the stage's own schedule starts at its first step
    elif parameter is not None:
      if old_multiplier.get(parameter, 0) > 0:
        old = old_leaves.get((old_labels[parameter], slot, parameter))
        if old is not None and old.shape == leaf.shape:
          value = old
    elif group is not None and sources.get(group):
      counts = [old_leaves.get((g, slot, None)) for g in sorted(sources[group])]
      counts = [c for c in counts if c is not None]
      if counts:
        value = max(counts, key=lambda c: int(c))
    carried.append(value)
  return jax.tree_util.tree_unflatten(treedef, carried)


def _is_schedule(node) -> bool:
  return isinstance(node, optax.ScaleByScheduleState)


def _leaves_with_paths(tree):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_schedule)[0]


def _slot_key(path, parameter_labels: Mapping[str, str]):
  """(group label, slot path without the group, parameter path or None) of a state leaf."""
  keys = list(path)
  group, group_at = None, None
  for i in range(len(keys) - 1):
    if (isinstance(keys[i], jax.tree_util.GetAttrKey) and keys[i].name == "inner_states"
        and isinstance(keys[i + 1], jax.tree_util.DictKey)):
      group, group_at = keys[i + 1].key, i + 1
      break
  # The parameter path is the longest tail of dict keys naming a parameter.
  parameter, tail_start = None, len(keys)
  names = []
  for i in range(len(keys) - 1, (group_at if group_at is not None else -1), -1):
    if not isinstance(keys[i], jax.tree_util.DictKey):
      break
    names.insert(0, str(keys[i].key))
    if "/".join(names) in parameter_labels:
      parameter, tail_start = "/".join(names), i
  slot = tuple(str(k) for j, k in enumerate(keys[:tail_start]) if j != group_at)
  return group, slot, parameter


# ----------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------

def _length(value: float, unit: str) -> dict[str, float]:
  if unit not in ("epochs", "steps"):
    raise ValueError(f"unit must be 'epochs' or 'steps', not {unit!r}.")
  return {unit: value}


def lp_ft(probe_length: float, fine_tune_length: float, probe_learning_rate: float,
          fine_tune_learning_rate: float, unit: str = "epochs",
          **fine_tune_options) -> list[dict[str, Any]]:
  """Linear probe, then fine-tune everything ("LP-FT").

  The head is first trained alone on frozen features, so fine-tuning starts
  from a head that fits them instead of a random one.

  Args:
    probe_length: the first stage's length in `unit`.
    fine_tune_length: the second stage's length in `unit`.
    probe_learning_rate: the first stage's peak rate.
    fine_tune_learning_rate: the second stage's peak rate.
    unit: "epochs" or "steps".
    **fine_tune_options: more keys of the second stage (e.g. warmup_steps).

  Returns:
    A `config.stages` list.

  Examples:
    >>> config.stages = stages.lp_ft(2, 8, 0.1, 0.01)
  """
  return [
      {"name": "linear_probe", **_length(probe_length, unit), "freeze": "linear_probe",
       "learning_rate": probe_learning_rate},
      {"name": "fine_tune", **_length(fine_tune_length, unit), "freeze": "none",
       "learning_rate": fine_tune_learning_rate, **fine_tune_options},
  ]


def gradual_unfreezing(num_stages: int, phase_length: float, learning_rate: float,
                       unit: str = "epochs", final_length: float | None = None,
                       ) -> list[dict[str, Any]]:
  """Unfreeze one more stage per phase, from the head down (as in ULMFiT).

  Phase 0 trains the head, phase 1 the head and the last stage, ... and the
  last phase everything (stem included).

  Args:
    num_stages: body stages of the model (`len(model.stage_names) - 1` for a
      ResNet with a stem; 3 for a CIFAR ResNet).
    phase_length: length of each phase in `unit`.
    learning_rate: peak rate of every phase.
    unit: "epochs" or "steps".
    final_length: length of the last (everything trainable) phase; defaults
      to `phase_length`.

  Returns:
    A `config.stages` list of `num_stages + 2` phases.
  """
  phases = [{"name": "head", **_length(phase_length, unit), "freeze": "linear_probe",
             "learning_rate": learning_rate}]
  for unfrozen in range(1, num_stages + 1):
    phases.append({"name": f"top{unfrozen}", **_length(phase_length, unit),
                   "freeze": f"depth:{num_stages - unfrozen}", "learning_rate": learning_rate})
  phases.append({"name": "all", **_length(final_length or phase_length, unit),
                 "freeze": "none", "learning_rate": learning_rate})
  return phases


def delayed_backbone(release_at: float, total_length: float, learning_rate: float,
                     backbone_multiplier: float = 0.1, unit: str = "epochs",
                     ) -> list[dict[str, Any]]:
  """Train the head alone, then release the backbone at a lower rate.

  Args:
    release_at: when the backbone starts training, in `unit`.
    total_length: the run's length in `unit`.
    learning_rate: the head's peak rate (both stages).
    backbone_multiplier: the backbone's rate relative to the head's.
    unit: "epochs" or "steps".

  Returns:
    A `config.stages` list.
  """
  if not 0 < release_at < total_length:
    raise ValueError(f"release_at={release_at} must lie inside the run (0, {total_length}).")
  return [
      {"name": "head", **_length(release_at, unit), "freeze": "linear_probe",
       "learning_rate": learning_rate},
      {"name": "backbone", **_length(total_length - release_at, unit),
       "freeze": f"backbone_lr:{backbone_multiplier}", "learning_rate": learning_rate},
  ]


def make_stage_optimizer(stage: Stage, freezing: Freezing) -> optax.GradientTransformation:
  """The stage's optimizer; its schedule spans the stage."""
  return optim.make_optimizer(stage.optimizer, freezing, stage.num_steps)
