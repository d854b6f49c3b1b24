"""Freeze rules -> label tree, trainable subtree, BatchNorm modes, learning-rate multipliers.

Freezing is data: an ordered list of `(regex, rule)` pairs over `/`-joined
parameter paths such as `stage2/block1/conv1/kernel`. The first matching
pattern wins and every parameter must be matched. A rule is

* `"frozen"` (or `None`, or `0`): no update, no optimizer state, no gradient;
* `"trainable"` (or `1`): trained at the base learning rate;
* a positive number `m`: trained at `m` times the base learning rate.

Helpers build the usual lists:

    >>> freeze_depth(model.stage_names, 2)      # stem, stage1, stage2 frozen
    [('(stem|stage1|stage2)/.*', 'frozen'), ('.*', 'trainable')]
    >>> rules_from_spec("linear_probe", model.stage_names)
    [('head/.*', 'trainable'), ('.*', 'frozen')]

`compile_rules(rules, params)` turns a list into a `Freezing`, which the
optimizer (`tlflax.optim`) and the train step (`tlflax.steps`) use.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Mapping, Sequence, Union

import numpy as np

from tlflax.tree import flatten, unflatten

RuleValue = Union[str, float, int, None]
FreezeRules = Sequence[tuple[str, RuleValue]]

FROZEN = "frozen"

# How BatchNorm layers behave in training (see `Freezing.frozen_batchnorm`).
BATCHNORM_MODES = ("frozen_layers", "all", "none")


def rule_multiplier(rule: RuleValue) -> float:
  """The learning-rate multiplier a rule stands for; 0.0 means frozen."""
  if rule is None or (isinstance(rule, str) and rule.lower() in ("frozen", "freeze")):
    return 0.0
  if isinstance(rule, str) and rule.lower() in ("trainable", "train"):
    return 1.0
  if isinstance(rule, (int, float)) and not isinstance(rule, bool) and rule >= 0:
    return float(rule)
  raise ValueError(f"Unknown freeze rule {rule!r}: use 'frozen', 'trainable' or a "
                   "non-negative learning-rate multiplier.")


def group_label(multiplier: float) -> str:
  """Optimizer group name: parameters with the same multiplier share one transform."""
  return FROZEN if multiplier == 0.0 else f"lr_x{multiplier:g}"


@dataclasses.dataclass(frozen=True)
class Freezing:
  """A freeze-rule list compiled against a parameter tree.

  Attributes:
    rules: the `(regex, rule)` list it came from.
    path_rule: parameter path -> index of the rule that matched it.
    path_multiplier: parameter path -> learning-rate multiplier (0 = frozen).
    batchnorm_mode: "frozen_layers" (frozen layers normalise with their
      running statistics and never update them, the default), "all" (every
      BatchNorm layer does so) or "none" (frozen layers' statistics adapt).
  """
  rules: tuple[tuple[str, RuleValue], ...]
  path_rule: Mapping[str, int]
  path_multiplier: Mapping[str, float]
  shapes: Mapping[str, tuple[int, ...]]
  batchnorm_mode: str = "frozen_layers"

  def labels(self) -> dict[str, Any]:
    """The label tree for `optax.partition` over the full parameter tree."""
    return unflatten({p: group_label(m) for p, m in self.path_multiplier.items()})

  def trainable_mask(self) -> dict[str, Any]:
    return unflatten({p: m > 0 for p, m in self.path_multiplier.items()})

  @property
  def trainable_paths(self) -> list[str]:
    return [p for p, m in self.path_multiplier.items() if m > 0]

  @property
  def frozen_paths(self) -> list[str]:
    return [p for p, m in self.path_multiplier.items() if m == 0]

  @property
  def all_frozen(self) -> bool:
    return not self.trainable_paths

  def split(self, params) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a parameter tree into (trainable subtree, frozen subtree)."""
    flat = flatten(params)
    trainable = {p: v for p, v in flat.items() if self.path_multiplier[p] > 0}
    frozen = {p: v for p, v in flat.items() if self.path_multiplier[p] == 0}
    return unflatten(trainable), unflatten(frozen)

  def trainable_labels(self) -> dict[str, Any]:
    """Labels of the trainable subtree only (what the fast step optimises)."""
    return unflatten({p: group_label(m) for p, m in self.path_multiplier.items() if m > 0})

  def frozen_batchnorm(self, batch_stats) -> tuple[str, ...]:
    """Module-path patterns of BatchNorm layers to hold in inference mode.

    A BatchNorm layer counts as frozen when its scale is frozen (or, without a
    scale, its bias); the model receives these as `frozen_batchnorm=`.
    """
    if self.batchnorm_mode == "all":
      return (".*",)
    if self.batchnorm_mode == "none":
      return ()
    modules = sorted({p.rsplit("/", 1)[0] for p in flatten(batch_stats)})
    frozen = []
    for module in modules:
      affine = [f"{module}/scale", f"{module}/bias"]
      known = [p for p in affine if p in self.path_multiplier]
      if known and self.path_multiplier[known[0]] == 0:
        frozen.append(re.escape(module))
    return tuple(frozen)

  def summary(self, base_learning_rate: float | None = None) -> str:
    """A table: one row per rule, its parameter count, frozen or trainable, its rate."""
    header = f"{'rule':<40} {'parameters':>12} {'tensors':>8}  {'status':<10} {'learning rate':>14}"
    lines = [header, "-" * len(header)]
    total = trainable = 0
    for index, (pattern, rule) in enumerate(self.rules):
      paths = [p for p, i in self.path_rule.items() if i == index]
      count = int(sum(np.prod(self.shapes[p]) for p in paths))
      multiplier = rule_multiplier(rule)
      total += count
      trainable += count if multiplier > 0 else 0
      if multiplier == 0:
        status, rate = "frozen", "-"
      else:
        status = "trainable"
        rate = (f"{base_learning_rate * multiplier:.3g}" if base_learning_rate is not None
                else f"x{multiplier:g}")
      lines.append(f"{pattern[:40]:<40} {count:>12,} {len(paths):>8}  {status:<10} {rate:>14}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<40} {total:>12,}   trainable {trainable:,} "
                 f"({100 * trainable / max(total, 1):.1f}%); BatchNorm: {self.batchnorm_mode}")
    return "\n".join(lines)


def compile_rules(rules: FreezeRules, params, batchnorm_mode: str = "frozen_layers",
                  require_matches: bool = False,
                  stage_names: Sequence[str] | None = None) -> Freezing:
  """Matches every parameter against the ordered rules (first match wins).

  Args:
    rules: `(regex, rule)` pairs; regexes must match the whole `/`-joined path.
    params: the parameter tree (or its shapes).
    batchnorm_mode: see `Freezing`.
    require_matches: every rule must be the first match of some parameter; a
      rule that decides nothing (a typo such as `stage_1/.*`, or a rule after
      `('.*', ...)`) is an error. The training loop asks this of rules a
      user wrote.
    stage_names: the model's stages, to suggest the nearest names for a
      rule that matches nothing.

  Raises:
    ValueError: a parameter matched by no rule, or (with `require_matches`)
      a rule that matches none (named), a bad regex or rule.
  """
  if batchnorm_mode not in BATCHNORM_MODES:
    raise ValueError(f"Unknown batchnorm_mode {batchnorm_mode!r}; use one of {BATCHNORM_MODES}.")
  rules = tuple((str(p), r) for p, r in rules)
  compiled = []
  for pattern, rule in rules:
    try:
      compiled.append((re.compile(pattern), rule_multiplier(rule)))
    except re.error as e:
      raise ValueError(f"Freeze rule pattern {pattern!r} is not a valid regex: {e}") from e
  flat = flatten(params)
  path_rule, path_multiplier, unmatched = {}, {}, []
  for path in flat:
    for index, (regex, multiplier) in enumerate(compiled):
      if regex.fullmatch(path):
        path_rule[path], path_multiplier[path] = index, multiplier
        break
    else:
      unmatched.append(path)
  if unmatched:
    raise ValueError(
        f"{len(unmatched)} parameters match no freeze rule, e.g. "
        + ", ".join(unmatched[:5])
        + ". Every parameter must be matched; end the list with ('.*', 'trainable') "
          "or ('.*', 'frozen') to say what happens to the rest.")
  if require_matches:
    deciding = set(path_rule.values())
    unused = [index for index in range(len(rules)) if index not in deciding]
    if unused:
      raise ValueError(_unused_rules_message(rules, unused, compiled, flat, stage_names))
  shapes = {p: tuple(np.shape(v)) for p, v in flat.items()}
  return Freezing(rules, path_rule, path_multiplier, shapes, batchnorm_mode)


def _unused_rules_message(rules, unused, compiled, flat, stage_names) -> str:
  """Names each rule that decides no parameter, and why."""
  parts = []
  top_level = list(dict.fromkeys([*(stage_names or ()), *(p.split("/")[0] for p in flat)]))
  for index in unused:
    pattern = rules[index][0]
    matches = [p for p in flat if compiled[index][0].fullmatch(p)]
    if matches:
      earlier = rules[path_rule_index(compiled, matches[0])][0]
      parts.append(f"rule {index} ({pattern!r}, {rules[index][1]!r}) comes after {earlier!r}, "
                   "which already matches everything it would")
      continue
    head = re.split(r"[^A-Za-z0-9_]", pattern.lstrip("(^"), maxsplit=1)[0]
    close = difflib.get_close_matches(head, top_level, n=3, cutoff=0.5) if head else []
    hint = f" (the nearest names: {', '.join(close)})" if close else ""
    parts.append(f"rule {index} ({pattern!r}, {rules[index][1]!r}) matches no parameter{hint}")
  return ("Freeze rules that decide nothing: " + "; ".join(parts) + ". Parameter paths look "
          f"like {next(iter(flat), '')!r}; the model's top-level names are "
          f"{', '.join(top_level)}. Fix or remove these rules.")


def path_rule_index(compiled, path: str) -> int:
  """The index of the first compiled rule that matches `path`."""
  return next(i for i, (regex, _) in enumerate(compiled) if regex.fullmatch(path))


# ----------------------------------------------------------------------------
# Helpers that produce rule lists
# ----------------------------------------------------------------------------

def _any_of(names: Sequence[str]) -> str:
  return "(" + "|".join(re.escape(n) for n in names) + ")/.*"


def _body_stages(stage_names: Sequence[str]) -> list[str]:
  return [s for s in stage_names if s != "stem"]


def freeze_depth(stage_names: Sequence[str], depth: int) -> list[tuple[str, RuleValue]]:
  """Freeze the stem and the first `depth` stages; train the rest and the head.

  `depth = len(stages)` is the linear probe. Models without a stem (VGG) freeze
  just their first `depth` stages.
  """
  stages = _body_stages(stage_names)
  if not 0 <= depth <= len(stages):
    raise ValueError(f"Freeze depth {depth} out of range: this model has stages "
                     f"{stages}, so use 0..{len(stages)}.")
  frozen = [s for s in stage_names if s == "stem"] + stages[:depth]
  if not frozen:
    return [(".*", "trainable")]
  return [(_any_of(frozen), FROZEN), (".*", "trainable")]


def linear_probe() -> list[tuple[str, RuleValue]]:
  """Train the head only."""
  return [("head/.*", "trainable"), (".*", FROZEN)]


def full_fine_tuning() -> list[tuple[str, RuleValue]]:
  return [(".*", "trainable")]


def model_blocks(stage_names: Sequence[str]) -> tuple[str, ...]:
  """The finer units a model's stage names carry, input side first, or ().

  A ViT's `stage_names` carries `.blocks` ("stage1/block1", ...): its stages
  group several transformer blocks, and `lld:` and `surgical:` work per
  block. A CNN's stage names carry none.
  """
  return tuple(getattr(stage_names, "blocks", ()))


def surgical(stage_names: Sequence[str], stage: str, train_head: bool = True):
  """Train one chosen stage only (and the new head, unless `train_head=False`).

  `stage` may also be one block of a model whose stage names carry blocks
  (`model_blocks`), e.g. "stage2/block1" of a ViT.
  """
  blocks = model_blocks(stage_names)
  if stage not in stage_names and stage not in blocks:
    raise ValueError(f"{stage!r} is not a stage of this model: {list(stage_names)}"
                     + (f" (or a block: {blocks[0]} ... {blocks[-1]})" if blocks else "")
                     + ".")
  rules = [(_any_of([stage]), "trainable")]
  if train_head:
    rules.append(("head/.*", "trainable"))
  return rules + [(".*", FROZEN)]


def batchnorm_only():
  """Train only BatchNorm scales and biases, and the head.

  Relies on tlflax's naming: every BatchNorm module's name contains `bn`.
  """
  return [("head/.*", "trainable"), (r".*bn[^/]*/(scale|bias)", "trainable"), (".*", FROZEN)]


def layerwise_lr_decay(stage_names: Sequence[str], decay: float):
  """Each stage's rate is `decay ** distance_from_head` times the base.

  The head has distance 0, the last stage 1, ..., the stem the largest.
  When the stage names carry blocks (a ViT, see `model_blocks`) the distance
  counts blocks, as BEiT and timm's layer decay do: the last block 1, the
  first block `len(blocks)`, the stem one more; parameters in no block and
  no stem (a ViT's final LayerNorm) learn at the head's rate.
  """
  if not 0 < decay <= 1:
    raise ValueError(f"Layer-wise decay must be in (0, 1], got {decay}.")
  rules = [("head/.*", 1.0)]
  blocks = model_blocks(stage_names)
  if blocks:
    stem = [s for s in stage_names if s == "stem"]
    for distance, layer in enumerate(reversed([*stem, *blocks]), start=1):
      rules.append((_any_of([layer]), decay ** distance))
    return rules + [(".*", 1.0)]
  for distance, stage in enumerate(reversed(stage_names), start=1):
    rules.append((_any_of([stage]), decay ** distance))
  return rules


def backbone_multiplier(multiplier: float):
  """The head at the base rate, everything else at `multiplier` times it."""
  if not 0 < multiplier <= 1:
    raise ValueError(f"The backbone multiplier must be in (0, 1], got {multiplier}.")
  return [("head/.*", 1.0), (".*", multiplier)]


def discriminative(groups: Mapping[str, float], default: RuleValue = "trainable"):
  """Named groups with their own multipliers, e.g. {"stem|stage1": 0.1}, then `default`."""
  rules = [(f"({pattern})/.*", multiplier) for pattern, multiplier in groups.items()]
  return rules + [(".*", default)]


def _number(text: str, example: str) -> float:
  try:
    return float(text)
  except ValueError as e:
    raise ValueError(f"{text!r} is not a number (e.g. {example!r})") from e


def compile_spec(spec: str | FreezeRules, params, stage_names: Sequence[str],
                 batchnorm_mode: str = "frozen_layers") -> Freezing:
  """A freeze spec compiled against `params`, under the one policy tlflax applies.

  Rules a user wrote (a list of `(regex, rule)`) must each decide some
  parameter, so a typo is an error; the rule lists a spec string makes are
  exempt ("batchnorm" on a network without BatchNorm trains its head alone).
  The training loop's stages and `tlflax.nnx.to_nnx` both compile here, so a
  spec means the same in both.

  Args:
    spec: a `rules_from_spec` string ("depth:2", "batchnorm", ...) or a rule list.
    params: the parameter tree (or its shapes).
    stage_names: the model's stages (`model.stage_names`).
    batchnorm_mode: see `Freezing`.

  Raises:
    ValueError: as `rules_from_spec` and `compile_rules` do.
  """
  rules = rules_from_spec(spec, stage_names)
  return compile_rules(rules, params, batchnorm_mode=batchnorm_mode,
                       require_matches=not isinstance(spec, str), stage_names=stage_names)


def rules_from_spec(spec: str | FreezeRules, stage_names: Sequence[str]):
  """Rule lists from short config strings.

  Accepted: "none" / "full" (train everything), "linear_probe", "depth:K",
  "surgical:STAGE", "batchnorm", "lld:DECAY", "backbone_lr:MULTIPLIER"; a list of `(regex, rule)` pairs
  is returned unchanged.
  """
  if not isinstance(spec, str):
    return [tuple(pair) for pair in spec]
  name, _, argument = spec.partition(":")
  try:
    if name in ("none", "full"):
      return full_fine_tuning()
    if name == "linear_probe":
      return linear_probe()
    if name == "depth":
      if not argument.strip().isdigit():
        raise ValueError(f"the depth must be a whole number of stages, e.g. 'depth:2' "
                         f"(0..{len(_body_stages(stage_names))} for this model)")
      return freeze_depth(stage_names, int(argument))
    if name == "surgical":
      return surgical(stage_names, argument)
    if name == "batchnorm":
      return batchnorm_only()
    if name == "lld":
      return layerwise_lr_decay(stage_names, _number(argument, "lld:0.7"))
    if name == "backbone_lr":
      return backbone_multiplier(_number(argument, "backbone_lr:0.1"))
  except ValueError as e:
    raise ValueError(f"Freeze spec {spec!r}: {e}") from e
  raise ValueError(f"Unknown freeze spec {spec!r}. Use 'none', 'linear_probe', 'depth:K', "
                   "'surgical:STAGE', 'batchnorm', 'lld:DECAY', 'backbone_lr:M' or a list "
                   "of (regex, rule).")
