"""A sweep's points: named sets of config overrides, each one run.

A sweep config is an ordinary config file (`get_config()`) that also defines
`sweep()`, returning a list of points: dicts of dotted-key overrides such as
`{"freeze.rules": "depth:2", "seed": 1}`. Two keys are not settings: `name`
names the point's directory (otherwise it is made from the overrides, here
`freeze_rules-depth_2__seed-1`), and `group` names the table row it is
reported in (points of a group are averaged, e.g. the seeds of one method;
`seeded` makes such points). Optional module-level names: `SWEEP_X`, the key
to plot accuracy against (default `freeze.rules`); `SWEEP_COLUMNS`, the
settings the table shows (default every key the points vary); `SWEEP_TITLE`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any, Sequence

import ml_collections

from tlflax import defaults
from tlflax.sweeps.results import GROUP_KEY, NAME_KEY, SEED_KEY, SweepError, value_hash
from tlflax.tree import flatten_dotted

RESERVED_KEYS = (NAME_KEY, GROUP_KEY)  # keys of a point that are not config settings
_LONG_VALUE = 32  # characters; longer values are named by a hash
_LONG_NAME = 120  # characters; a longer point name is cut and ends with a hash


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its position, directory name and overrides."""
  index: int
  name: str
  overrides: dict[str, Any]


def point_name(overrides: dict[str, Any]) -> str:
  """The directory name of a point: its `name` key, else made from its overrides.

  Args:
    overrides: a point, e.g. `{"freeze.rules": "depth:2", "seed": 1}`.

  Returns:
    A stable file name, e.g. `freeze_rules-depth_2__seed-1`. Lists, dicts and
    long strings appear as a hash of their JSON, e.g. `stages-3f2a9c01d4`.
  """
  if NAME_KEY in overrides:
    name = str(overrides[NAME_KEY])
    if not name or name in (".", "..") or "/" in name or os.sep in name:
      raise SweepError(f"Point name {name!r} is not a directory name: use letters, digits, "
                       "'_', '-' or '.', without '/'.")
    return name
  parts = [f"{key.replace('.', '_')}-{_value_slug(value)}" for key, value in overrides.items()
           if key not in RESERVED_KEYS]
  name = "__".join(parts) or "base"
  if len(name) > _LONG_NAME:  # file systems allow 255 bytes
    name = f"{name[:_LONG_NAME - 12]}__{value_hash(overrides)}"
  return name


def _value_slug(value: Any) -> str:
  if isinstance(value, (bool, int, float)):
    return str(value)
  if isinstance(value, str) and len(value) <= _LONG_VALUE:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_") or "empty"
  return value_hash(value)


def make_points(overrides_list: Sequence[dict[str, Any]],
                config: ml_collections.ConfigDict) -> list[Point]:
  """Names and checks the points that a config's `sweep()` returned.

  Args:
    overrides_list: the return value of `sweep()`.
    config: the base config; every overridden key must exist in it.

  Returns:
    One `Point` per entry, in order.

  Raises:
    SweepError: an entry that is not a dict, overrides an unknown key or a
      value of the wrong type or range, or two points with the same name.
    ConfigError: the base config itself has a key outside the schema or a
      number out of range (see `tlflax.defaults.check_config`).
  """
  defaults.check_config(config)
  if isinstance(overrides_list, dict) or not overrides_list:
    raise SweepError(f"sweep() must return a non-empty list of override dicts, got "
                     f"{overrides_list!r}.")
  points, seen, known = [], {}, _leaf_keys(config)
  for index, overrides in enumerate(overrides_list):
    if not isinstance(overrides, dict):
      raise SweepError(f"sweep() entry {index} is {overrides!r}; each entry must be a dict of "
                       "dotted-key overrides, e.g. {'freeze.rules': 'depth:2', 'seed': 1}.")
    point = Point(index, point_name(overrides), dict(overrides))
    if point.name in seen:
      raise SweepError(f"Points {seen[point.name]} and {index} are both named {point.name!r}; "
                       "give them distinct overrides or distinct 'name' keys.")
    seen[point.name] = index
    check_overrides(config, point, known)
    points.append(point)
  return points


def check_overrides(config: ml_collections.ConfigDict, point: Point,
                    known: set[str] | None = None) -> None:
  """Raises SweepError naming the point if its run's config would be refused.

  The point may override only keys of the base config (whose keys are
  those of the schema, `tlflax.defaults.base_config`), with values of the
  key's type; the config it makes must pass `tlflax.defaults.check_config`
  (numbers in range, stages that can run).

  Args:
    config: the base config.
    point: the point to check.
    known: the config's dotted leaf keys, if already computed.
  """
  known = known if known is not None else _leaf_keys(config)
  where = f"Point {point.name!r} (sweep() entry {point.index})"
  for key in point.overrides:
    if key == "seeds":
      raise SweepError(f"Point {point.name!r} has 'seeds': in a sweep each seed is its own "
                       "point, e.g. [{'seed': s} for s in range(3)].")
    if key not in RESERVED_KEYS and key not in known:
      near = defaults.nearest_key(key, known)
      hint = f" Did you mean {near}?" if near else ""
      raise SweepError(f"{where} overrides unknown config key {key!r}.{hint} Every key is in "
                       "tlflax/defaults.py.")
  try:
    defaults.check_config(point_config(config, point, ""), where)
  except (TypeError, ValueError, KeyError) as e:
    raise SweepError(f"{where}: {e}") from e


def _leaf_keys(config) -> set[str]:
  return set(flatten_dotted(config.to_dict()))


def point_config(config: ml_collections.ConfigDict, point: Point,
                 workdir: str) -> ml_collections.ConfigDict:
  """The base config with the point's overrides applied (every key must exist).

  An `init.weights` of `"@<point name>"` starts from another point's final
  parameters, in `workdir/<point name>`.

  Args:
    config: the base config.
    point: the point.
    workdir: the sweep's directory.

  Returns:
    A new, locked ConfigDict.
  """
  run = ml_collections.ConfigDict(config.to_dict())
  run.lock()
  for key, value in point.overrides.items():
    if key in RESERVED_KEYS:
      continue
    parent, _, leaf = key.rpartition(".")
    node = run
    for part in filter(None, parent.split(".")):
      node = node[part]
    if leaf not in node:
      raise SweepError(f"Point {point.name!r} overrides unknown key {key!r}; every key is in "
                       "tlflax/defaults.py.")
    node[leaf] = tuple(value) if isinstance(value, list) else value
  if run.init.weights.startswith("@"):
    run.init.weights = os.path.join(workdir, run.init.weights[1:])
    run.init.source = "workdir"
  return run


def seeded(name: str, overrides: dict[str, Any], seeds: Sequence[int]) -> list[dict[str, Any]]:
  """One point per seed, reported as one row (mean and spread over the seeds).

  Args:
    name: the row's name; point `k` is named `<name>__seed-<seed>`.
    overrides: the settings every seed shares.
    seeds: the seeds.

  Returns:
    Points for `sweep()` to return.

  Examples:
    >>> seeded("fine_tune", {"init.weights": "@pretrain"}, range(2))
    [{'init.weights': '@pretrain', 'seed': 0, 'name': 'fine_tune__seed-0', 'group': 'fine_tune'},
     {'init.weights': '@pretrain', 'seed': 1, 'name': 'fine_tune__seed-1', 'group': 'fine_tune'}]
  """
  return [{**overrides, SEED_KEY: int(seed), NAME_KEY: f"{name}__seed-{seed}", GROUP_KEY: name}
          for seed in seeds]


def load_config_module(path: str) -> Any:
  """Imports a config file as a module (to see whether it defines `sweep()`).

  Args:
    path: the config file, optionally followed by `:ARG` (passed to get_config).

  Returns:
    The module (with `get_config`, and for a sweep `sweep` and optionally
    `SWEEP_X`, `SWEEP_COLUMNS`, `SWEEP_TITLE`).
  """
  path = path.split(":", 1)[0]
  spec = importlib.util.spec_from_file_location("tlflax_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep_module(path: str) -> Any:
  """Imports a sweep config file; it must define `sweep()`.

  Args:
    path: the config file, optionally followed by `:ARG`.

  Returns:
    The module, as `load_config_module` returns it.

  Raises:
    SweepError: the file has no `sweep()`.
  """
  module = load_config_module(path)
  if not callable(getattr(module, "sweep", None)):
    raise SweepError(f"{path.split(':', 1)[0]} has no sweep() function. A sweep config "
                     "defines get_config() and sweep(), which returns a list of override "
                     "dicts, e.g. [{'freeze.rules': f'depth:{k}', 'seed': s} for k in range(4) "
                     "for s in range(3)]. Without sweep(), the config is one run.")
  return module
