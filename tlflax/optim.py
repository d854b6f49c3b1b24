"""Optimizer config + freezing -> one `optax` transformation.

The transformation is an `optax.partition` over the freezing's label tree:
one group per learning-rate multiplier, each with the configured optimizer
and schedule scaled by its multiplier, and — over the full tree — a `frozen`
group that gets `optax.set_to_zero()` and holds no state.

tlflax's own train step optimises only the trainable subtree
(`full_tree=False`), so frozen parameters never reach the optimizer at all;
`full_tree=True` is for code that keeps the whole tree (and the benchmark's
"usual way" reference).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

from tlflax.freeze import FROZEN, Freezing, group_label


def default_config() -> ml_collections.ConfigDict:
  """Optimizer settings with their defaults (the `optimizer` block of a config)."""
  return ml_collections.ConfigDict(dict(
      name="sgd",            # "sgd" (momentum) or "adamw"
      learning_rate=0.01,    # peak rate, reached after warmup
      momentum=0.9,          # sgd
      nesterov=False,        # sgd
      b1=0.9, b2=0.999,      # adamw
      weight_decay=0.0,      # L2 for sgd, decoupled for adamw
      decay_all=False,       # False: no decay on biases and BatchNorm parameters
      schedule="cosine",     # "cosine" or "constant", both after linear warmup
      warmup_steps=0,
      grad_clip_norm=0.0,    # 0 = no clipping; the norm is over trainable params only
  ))


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to 0 (or constant)."""
  peak, warmup = config.learning_rate, int(config.warmup_steps)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(int(total_steps), warmup + 1), end_value=0.0)
  if config.schedule == "constant":
    if not warmup:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  raise ValueError(f"Unknown schedule {config.schedule!r}; use 'cosine' or 'constant'.")


def decay_mask(tree) -> Any:
  """True for weights that get weight decay: kernels, not biases or BatchNorm."""
  def decide(path, _):
    return getattr(path[-1], "key", None) == "kernel"
  return jax.tree_util.tree_map_with_path(decide, tree)


def group_optimizer(config, schedule: optax.Schedule, multiplier: float):
  """The configured optimizer at `multiplier` times the scheduled rate."""
  rate = lambda step: multiplier * schedule(step)
  mask = None if config.decay_all else decay_mask
  if config.name == "sgd":
    parts = []
    if config.weight_decay:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask))
    parts.append(optax.sgd(rate, momentum=config.momentum or None, nesterov=config.nesterov))
    return optax.chain(*parts)
  if config.name == "adamw":
    return optax.adamw(rate, b1=config.b1, b2=config.b2,
                       weight_decay=config.weight_decay, mask=mask)
  raise ValueError(f"Unknown optimizer {config.name!r}; use 'sgd' or 'adamw'.")


def make_optimizer(config, freezing: Freezing, total_steps: int,
                   full_tree: bool = False) -> optax.GradientTransformation:
  """Builds the optimizer for a freezing.

  Args:
    config: the `optimizer` config block (see `default_config`).
    freezing: compiled freeze rules.
    total_steps: length of the schedule.
    full_tree: False: the transformation takes the trainable subtree only
      (`freezing.split(params)[0]`). True: it takes the full parameter tree
      and zeroes the frozen group's updates.

  Returns:
    An `optax.GradientTransformation`.
  """
  config = _with_defaults(config)
  schedule = learning_rate_schedule(config, total_steps)
  multipliers = sorted({m for m in freezing.path_multiplier.values() if m > 0})
  transforms = {group_label(m): group_optimizer(config, schedule, m) for m in multipliers}
  if full_tree:
    transforms[FROZEN] = optax.set_to_zero()
    labels = freezing.labels()
  else:
    labels = freezing.trainable_labels()
  tx = optax.partition(transforms, labels)
  if config.grad_clip_norm:
    clip = optax.clip_by_global_norm(config.grad_clip_norm)
    if full_tree:  # Only the trainable gradients count towards the norm.
      clip = optax.masked(clip, freezing.trainable_mask())
    tx = optax.chain(clip, tx)
  return tx


def _with_defaults(config) -> ml_collections.ConfigDict:
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  merged = default_config()
  unknown = sorted(set(given) - set(merged))
  if unknown:
    raise ValueError(f"Unknown optimizer settings {unknown}; known: {sorted(merged)}.")
  merged.update(given)
  return merged


def schedule_fn(config, total_steps: int) -> Callable[[int], float]:
  """The base learning rate at a step, for logging."""
  return learning_rate_schedule(_with_defaults(config), total_steps)
