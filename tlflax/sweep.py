"""Sweeps: one config, a list of override points, one workdir per point.

    python -m tlflax.sweep --config configs/depth_sweep.py --workdir workdirs/depth_sweep

A sweep config is an ordinary config file (`get_config()`) that also defines
`sweep()`, returning a list of points: dicts of dotted-key overrides such as
`{"freeze.rules": "depth:2", "seed": 1}` (an optional `name` key names the
point; otherwise the name is made from the overrides, here
`freeze_rules-depth_2__seed-1`). An optional module-level `SWEEP_X` names the
key to plot accuracy against (default `freeze.rules`; `--x` overrides it).

The sweep's workdir DIR holds:
  sweep.json           the points and the base config (what `--collect` reads);
  <point>/             each point's own workdir (checkpoints, metrics.jsonl);
  <point>/result.json  written when the point finishes; such a point is skipped,
                       so an interrupted sweep continues, and an interrupted
                       point resumes from its own checkpoint;
  results.csv, results.md, accuracy_vs_depth.png
                       written by `--collect` and at the end of a full run.

Flags: `--list` prints one command per point (`... --point=N`) instead of
running, e.g. for a SLURM array (`--point $SLURM_ARRAY_TASK_ID`); `--point N`
runs that point only; `--collect` writes the reports from the points finished
so far; `--x KEY` sets the plot's x-axis; `--overwrite` lets a workdir that
holds a different sweep take this one (finished points are never deleted);
`--config.KEY=VALUE` overrides the base config, as with `tlflax.main`.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib.util
import json
import logging
import os
import re
import shlex
import sys
import time
from typing import Any, Sequence

import ml_collections

from tlflax import study, sweep_results
from tlflax.sweep_results import (DEFAULT_X, NAME_KEY, RESULT_FILE, SWEEP_FILE, SweepError,
                                  value_hash)

log = logging.getLogger(__name__)

_LONG_VALUE = 32  # characters; longer values are named by a hash
_LONG_NAME = 120  # characters; a longer point name is cut and ends with a hash


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its position, directory name and overrides."""
  index: int
  name: str
  overrides: dict[str, Any]


# -- Points: naming and checking ---------------------------------------------


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
  parts = [f"{key.replace('.', '_')}-{_value_slug(value)}" for key, value in overrides.items()]
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
      value of the wrong type, or two points with the same name.
  """
  if "runs" in config:
    raise SweepError("The config has `runs`, so it is a study (see tlflax.study): a sweep's "
                     "get_config() describes one run, and sweep() lists the variations.")
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
  """Raises SweepError naming the point if it overrides an unknown key or mistypes a value.

  Args:
    config: the base config.
    point: the point to check.
    known: the config's dotted leaf keys, if already computed.
  """
  known = known if known is not None else _leaf_keys(config)
  for key in point.overrides:
    if key == "seeds":
      raise SweepError(f"Point {point.name!r} has 'seeds': in a sweep each seed is its own "
                       "point, e.g. [{'seed': s} for s in range(3)].")
    if key != NAME_KEY and key not in known:
      close = difflib.get_close_matches(key, sorted(known), n=3)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      raise SweepError(f"Point {point.name!r} (sweep() entry {point.index}) overrides "
                       f"unknown config key {key!r}.{hint}")
  try:
    point_config(config, point, "")
  except (TypeError, ValueError, KeyError) as e:
    raise SweepError(f"Point {point.name!r} (sweep() entry {point.index}): {e}") from e


def _leaf_keys(config) -> set[str]:
  return set(sweep_results.flatten(config.to_dict()))


def point_config(config: ml_collections.ConfigDict, point: Point,
                 workdir: str) -> ml_collections.ConfigDict:
  """The base config with the point's overrides (via `study.run_config`).

  An `init.weights` of `"@<point name>"` starts from another point's final
  parameters, in `workdir/<point name>`.
  """
  return study.run_config(config, point.overrides, workdir)


# -- The sweep's workdir -------------------------------------------------------


def _as_json(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(value, default=str))


def _sweep_record(config: ml_collections.ConfigDict, points: Sequence[Point],
                 x_key: str) -> dict[str, Any]:
  return {"points": [{"name": p.name, "overrides": _as_json(p.overrides)} for p in points],
          "config": _as_json(config.to_dict()), "x": x_key}


def prepare(config: ml_collections.ConfigDict, points: Sequence[Point], workdir: str,
            x_key: str = DEFAULT_X, overwrite: bool = False) -> None:
  """Writes `workdir/sweep.json`, refusing one from a different sweep.

  Args:
    config: the base config.
    points: from `make_points`.
    workdir: the sweep's directory.
    x_key: the key `plot` puts on the x-axis.
    overwrite: replace the sweep.json of a different sweep. Nothing else is
      touched: finished points keep their results (and are not re-run).

  Raises:
    SweepError: `workdir` holds another sweep and `overwrite` is False.
  """
  os.makedirs(workdir, exist_ok=True)
  record = _sweep_record(config, points, x_key)
  path = os.path.join(workdir, SWEEP_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    differences = _describe_difference(old, record)
    if not differences:
      return
    if not overwrite:
      raise SweepError(
          f"{workdir} holds a different sweep ({'; '.join(differences)}). Use another "
          "--workdir, or pass --overwrite to redefine the sweep here: finished points keep "
          f"their {RESULT_FILE} and are not re-run (delete one to re-run it).")
    log.warning("Redefining the sweep in %s (%s).", workdir, "; ".join(differences))
  temporary = f"{path}.{os.getpid()}.tmp"  # array tasks may write at the same time
  with open(temporary, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(temporary, path)


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  differences = []
  old_points = {p["name"]: p["overrides"] for p in old.get("points", [])}
  new_points = {p["name"]: p["overrides"] for p in new["points"]}
  added = [n for n in new_points if n not in old_points]
  removed = [n for n in old_points if n not in new_points]
  changed = [n for n in new_points if n in old_points and old_points[n] != new_points[n]]
  for label, names in (("new points", added), ("points no longer listed", removed),
                       ("changed points", changed)):
    if names:
      differences.append(f"{label}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
  if not differences and list(old_points) != list(new_points):
    differences.append("the points are in a different order")
  old_config = sweep_results.flatten(old.get("config", {}))
  new_config = sweep_results.flatten(new["config"])
  keys = sorted(k for k in old_config.keys() | new_config.keys()
                if old_config.get(k) != new_config.get(k))
  if keys:
    differences.append(f"config keys differ: {', '.join(keys)}")
  return differences


def check_start_weights(config: ml_collections.ConfigDict, points: Sequence[Point],
                        workdir: str) -> None:
  """Fails before any training when a point starts from a workdir that is not there."""
  names = {p.name for p in points}
  for point in points:
    if os.path.exists(os.path.join(workdir, point.name, RESULT_FILE)):
      continue
    run = point_config(config, point, workdir)
    path = run.init.weights
    if run.init.source != "workdir" or not path or os.path.exists(path):
      continue
    if os.path.dirname(os.path.abspath(path)) == workdir and os.path.basename(path) in names:
      continue  # an earlier point of this sweep
    raise SweepError(f"Point {point.name!r} starts from the workdir {path!r} (init.source="
                     f"'workdir'), which does not exist (relative to {os.getcwd()}). Train "
                     "that run first (the sweep config's docstring says how) or set "
                     "--config.init.weights to where it is.")


def run_point(config: ml_collections.ConfigDict, point: Point, workdir: str) -> dict | None:
  """Trains one point in `workdir/<point name>` and writes its result.json.

  Args:
    config: the base config.
    point: from `make_points`.
    workdir: the sweep's directory.

  Returns:
    The point's result record, as written to result.json; None when training
    was preempted (no result.json: run again to resume the point).
  """
  point_dir = os.path.join(workdir, point.name)
  result_path = os.path.join(point_dir, RESULT_FILE)
  if os.path.exists(result_path):
    log.info("Point %d %s: finished before, skipped.", point.index, point.name)
    with open(result_path) as f:
      return json.load(f)
  from tlflax import train  # pylint: disable=import-outside-toplevel
  log.info("Point %d %s: training in %s", point.index, point.name, point_dir)
  started = time.monotonic()
  metrics = train.train_and_evaluate(point_config(config, point, workdir), point_dir)
  if metrics.get("preempted"):
    log.warning("Point %s was preempted at step %s; run again to resume it.", point.name,
                metrics.get("step"))
    return None
  os.makedirs(point_dir, exist_ok=True)
  record = {"point": point.name, "overrides": _as_json(point.overrides),
            "metrics": _as_json(metrics), "wall_seconds": time.monotonic() - started,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}
  temporary = f"{result_path}.tmp"  # a result.json is either complete or absent
  with open(temporary, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(temporary, result_path)
  return record


def run_sweep(config: ml_collections.ConfigDict, points: Sequence[Point], workdir: str,
              x_key: str = DEFAULT_X, overwrite: bool = False) -> list[sweep_results.Row] | None:
  """Runs every point not yet finished, then writes the reports.

  Args:
    config: the base config.
    points: from `make_points`.
    workdir: the sweep's directory.
    x_key: the key `plot` puts on the x-axis.
    overwrite: see `prepare`.

  Returns:
    The rows of `collect`; None when a point was preempted (run again).
  """
  workdir = os.path.abspath(workdir)
  prepare(config, points, workdir, x_key, overwrite)
  check_start_weights(config, points, workdir)
  for point in points:
    if run_point(config, point, workdir) is None:
      return None
  rows, _ = sweep_results.write_reports(workdir, x_key)
  return rows


def select_point(points: Sequence[Point], index: int) -> Point:
  """`points[index]`, or a SweepError saying how many points there are."""
  if not 0 <= index < len(points):
    raise SweepError(f"--point {index} is out of range: this sweep has {len(points)} points, "
                     f"so use 0..{len(points) - 1} (--list prints them).")
  return points[index]


# -- Config files and the command line --------------------------------------------


def load_sweep_module(path: str) -> Any:
  """Imports a sweep config file; it must define `sweep()`.

  Args:
    path: the config file, optionally followed by `:ARG` (passed to get_config).

  Returns:
    The module (with `get_config`, `sweep` and optionally `SWEEP_X`).
  """
  path = path.split(":", 1)[0]
  spec = importlib.util.spec_from_file_location("tlflax_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "sweep", None)):
    raise SweepError(f"{path} has no sweep() function. A sweep config defines get_config() "
                     "and sweep(), which returns a list of override dicts, e.g. "
                     "[{'freeze.rules': f'depth:{k}', 'seed': s} for k in range(4) for s in "
                     "range(3)]. To train one run, use python -m tlflax.main.")
  return module


def point_commands(config_arg: str, workdir: str, count: int,
                   config_overrides: Sequence[str] = (), x_key: str | None = None) -> list[str]:
  """One shell command per point, for a scheduler to run anywhere.

  Args:
    config_arg: the config file (with its `:ARG`, if any).
    workdir: the sweep's directory.
    count: the number of points.
    config_overrides: `--config.KEY=VALUE` arguments to repeat in each command.
    x_key: a `--x` to repeat, if one was given.

  Returns:
    `[".../python -m tlflax.sweep --config=/abs/file.py --workdir=/abs/dir ... --point=0", ...]`
  """
  path, colon, argument = config_arg.partition(":")
  base = [sys.executable, "-m", "tlflax.sweep", f"--config={os.path.abspath(path)}{colon}"
          f"{argument}", f"--workdir={os.path.abspath(workdir)}", *config_overrides]
  if x_key:
    base.append(f"--x={x_key}")
  return [shlex.join([*base, f"--point={index}"]) for index in range(count)]


def config_overrides_from_argv(argv: Sequence[str]) -> list[str]:
  """The `--config.KEY=VALUE` arguments of a command line, to pass on unchanged.

  Args:
    argv: the command line's arguments (without the program).

  Returns:
    The overrides, e.g. `["--config.num_train_steps=1"]` (a value given as a
    separate argument stays one).
  """
  passed, arguments = [], list(argv)
  for i, argument in enumerate(arguments):
    if argument.startswith("--config."):
      passed.append(argument)
      if "=" not in argument and i + 1 < len(arguments) and not arguments[i + 1].startswith("-"):
        passed.append(arguments[i + 1])
  return passed


def _print_results(workdir: str) -> None:
  with open(os.path.join(workdir, "results.md")) as f:
    print(f.read(), end="")
  print(f"Written: {workdir}/results.csv, results.md and the plot.")


def _main(argv, config_flag, flag_values) -> None:
  """The command line (see the module docstring); flags are defined in `_cli`."""
  if len(argv) > 1:
    raise SweepError(f"Unexpected arguments: {argv[1:]}")
  workdir = os.path.abspath(flag_values.workdir)
  if flag_values.list and flag_values.point is not None:
    raise SweepError("Use --list or --point, not both.")
  if flag_values.collect:
    if flag_values.list or flag_values.point is not None:
      raise SweepError("--collect only reads finished points: use it without --list and --point.")
    sweep_results.write_reports(workdir, flag_values.x)
    _print_results(workdir)
    return
  if config_flag.value is None:
    raise SweepError("--config is required (except with --collect).")
  config_file = flag_values["config"].config_filename  # with its ":ARG", if any
  module = load_sweep_module(config_file)
  x_key = flag_values.x or getattr(module, "SWEEP_X", DEFAULT_X)
  config = config_flag.value
  points = make_points(module.sweep(), config)

  if flag_values.list:
    prepare(config, points, workdir, x_key, flag_values.overwrite)
    print("\n".join(point_commands(config_file, workdir, len(points),
                                   config_overrides_from_argv(sys.argv[1:]), flag_values.x)))
  elif flag_values.point is not None:
    point = select_point(points, flag_values.point)
    prepare(config, points, workdir, x_key, flag_values.overwrite)
    check_start_weights(config, [point], workdir)
    if run_point(config, point, workdir) is not None:
      print(f"Point {point.index} ({point.name}) finished. When every point has, run the "
            "same command with --collect instead of --point.")
  elif run_sweep(config, points, workdir, x_key, flag_values.overwrite) is not None:
    _print_results(workdir)


def _cli() -> None:
  # Flags are defined here, not on import, so importing this module next to
  # tlflax.main (which also defines --config and --workdir) works.
  # pylint: disable=import-outside-toplevel
  from absl import app, flags
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "A sweep config file: get_config() and sweep().", lock_config=True)
  flags.DEFINE_string("workdir", None, "The sweep's directory (one sub-directory per point).")
  flags.DEFINE_bool("list", False, "Print one command per point (--point N) instead of running.")
  flags.DEFINE_integer("point", None, "Run only this point (0-based), e.g. $SLURM_ARRAY_TASK_ID.")
  flags.DEFINE_bool("collect", False, "Only write results.csv, results.md and the plot from the "
                    "points finished so far.")
  flags.DEFINE_bool("overwrite", False, "Redefine the sweep in a workdir that holds a different "
                    "one; finished points are kept.")
  flags.DEFINE_string("x", None, "The setting on the plot's x-axis (default: the config's "
                      f"SWEEP_X, else {DEFAULT_X}).")
  flags.mark_flag_as_required("workdir")

  def run(argv):
    # tlflax reports at INFO; libraries (orbax logs every file it writes) at WARNING.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("tlflax").setLevel(logging.INFO)
    try:
      _main(argv, config_flag, flags.FLAGS)
    except SweepError as e:
      sys.exit(f"Error: {e}")

  app.run(run)


if __name__ == "__main__":
  _cli()
