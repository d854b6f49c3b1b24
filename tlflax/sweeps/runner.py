"""Running a sweep: one workdir per point, finished points skipped, one set of reports.

The sweep's workdir DIR holds:
  sweep.json           the points and the base config (what the reports read);
  <point>/             each point's own workdir (checkpoints, metrics.jsonl);
  <point>/result.json  written when the point finishes; such a point is skipped,
                       so an interrupted sweep continues, and an interrupted
                       point resumes from its own checkpoint;
  results.csv, results.md, and a plot: accuracy_by_group.png (points with a
                       group, e.g. `seeded`) or accuracy_vs_<x>.png, written at
                       the end of a full run (and by `--collect`).

Points run in order, so a point may start from an earlier one's final
parameters (`init.weights="@<point name>"`).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from typing import Any, Sequence

import ml_collections

from tlflax import files, tree
from tlflax.sweeps import results
from tlflax.sweeps.points import Point, point_config
from tlflax.sweeps.results import DEFAULT_X, RESULT_FILE, SWEEP_FILE, SweepError
from tlflax.training import loop
from tlflax.training import workdir as workdir_lib
from tlflax.training.metrics import result_record

log = logging.getLogger(__name__)


def sweep_record(config: ml_collections.ConfigDict, points: Sequence[Point],
                 x_key: str = DEFAULT_X, columns: Sequence[str] | None = None,
                 title: str = "") -> dict[str, Any]:
  """What `sweep.json` holds: the points, the base config and how to report them."""
  return {"points": [{"name": p.name, "overrides": tree.to_json(p.overrides)} for p in points],
          "config": tree.to_json(config.to_dict()), "x": x_key,
          "columns": None if columns is None else list(columns), "title": title}


def prepare(config: ml_collections.ConfigDict, points: Sequence[Point], workdir: str,
            x_key: str = DEFAULT_X, overwrite: bool = False,
            columns: Sequence[str] | None = None, title: str = "") -> None:
  """Writes `workdir/sweep.json`, refusing one from a different sweep.

  Args:
    config: the base config.
    points: from `make_points`.
    workdir: the sweep's directory.
    x_key: the key `plot` puts on the x-axis.
    overwrite: replace the sweep.json of a different sweep. Nothing else is
      touched: finished points keep their results (and are not re-run), so
      a finished point whose settings the new sweep changes is refused.
    columns: the settings the table shows (None: every varied key).
    title: a line above the table.

  Raises:
    SweepError: `workdir` holds another sweep and `overwrite` is False, or
      the new sweep changes settings of finished points (naming them).
  """
  os.makedirs(workdir, exist_ok=True)
  record = sweep_record(config, points, x_key, columns, title)
  path = os.path.join(workdir, SWEEP_FILE)
  if os.path.exists(path):
    old = files.read_json(path)
    differences = _describe_difference(old, record)
    if not differences:
      return
    if not overwrite:
      raise SweepError(
          f"{workdir} holds a different sweep ({'; '.join(differences)}). Use another "
          "--workdir, or pass --overwrite to redefine the sweep here: finished points keep "
          f"their {RESULT_FILE} and are not re-run (delete one to re-run it).")
    _check_finished_points(config, points, workdir)
    log.warning("Redefining the sweep in %s (%s).", workdir, "; ".join(differences))
  files.write_json(path, record)  # atomic: array tasks may write at the same time


def _check_finished_points(config: ml_collections.ConfigDict, points: Sequence[Point],
                           workdir: str, limit: int = 5) -> None:
  """Refuses a redefined sweep that would report finished points it gives other settings.

  A finished point is skipped, so its result would stand for settings it
  did not run with: the rule a single finished run follows
  (`tlflax.training.workdir.check_rerun`), compared with the config the
  point ran under.
  """
  changed = []
  for point in points:
    point_dir = os.path.join(workdir, point.name)
    recorded = workdir_lib.config_record(point_dir) if os.path.exists(
        os.path.join(point_dir, RESULT_FILE)) else None
    if recorded is None:
      continue
    changes = workdir_lib.changed_settings(recorded, point_config(config, point, workdir))
    if changes:
      changed.append(f"{point.name} ({workdir_lib.describe_changes(changes)})")
  if changed:
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    raise SweepError(
        f"The redefined sweep changes settings of finished points, whose results would be "
        f"reported as this sweep's: {'; '.join(changed[:limit])}{more}. Use another "
        "--workdir, or delete those points' directories to re-run them.")


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
  old_config = tree.flatten_dotted(old.get("config", {}))
  new_config = tree.flatten_dotted(new["config"])
  # Keys that cannot change results (workdir.NOT_SETTINGS: worker counts,
  # caches) are not a different sweep.
  keys = sorted(k for k in old_config.keys() | new_config.keys()
                if old_config.get(k) != new_config.get(k) and workdir_lib.is_setting(k))
  if keys:
    differences.append(f"config keys differ: {', '.join(keys)}")
  return differences


def check_start_weights(config: ml_collections.ConfigDict, points: Sequence[Point],
                        workdir: str, all_points: Sequence[Point] | None = None) -> None:
  """Fails before any training when a point starts from weights that are not there yet.

  Args:
    config: the base config.
    points: the points about to run, in order.
    workdir: the sweep's directory.
    all_points: every point of the sweep. A point may start from an earlier
      point of `points` (it runs first); one that starts from a point outside
      `points` (e.g. `--point N` of a cluster array) needs that point finished
      (its result.json), not merely started.
  """
  running = [p.name for p in points]
  names = {p.name for p in (all_points or points)}
  for index, point in enumerate(points):
    if os.path.exists(os.path.join(workdir, point.name, RESULT_FILE)):
      continue
    run = point_config(config, point, workdir)
    path = run.init.weights
    if run.init.source != "workdir" or not path:
      continue
    source = os.path.basename(path)
    if os.path.dirname(os.path.abspath(path)) == workdir and source in names:
      if source in running[:index]:
        continue  # an earlier point of this run trains it first
      if not os.path.exists(os.path.join(workdir, source, RESULT_FILE)):
        raise SweepError(f"Point {point.name!r} starts from point {source!r}, which has not "
                         f"finished (no {os.path.join(workdir, source, RESULT_FILE)}). Run "
                         "that point first (--point of its index; --list prints them).")
      continue
    if not os.path.exists(path):
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
    return files.read_json(result_path)
  log.info("Point %d %s: training in %s", point.index, point.name, point_dir)
  started = time.monotonic()
  metrics = loop.train_and_evaluate(point_config(config, point, workdir), point_dir)
  if metrics.get("preempted"):
    log.warning("Point %s was preempted at step %s; run again to resume it.", point.name,
                metrics.get("step"))
    return None
  os.makedirs(point_dir, exist_ok=True)
  # The schema a single run's result.json has, plus which point it is.
  # A point that had finished (its result.json lost) took an unknown time.
  seconds = None if metrics.get("already_finished") else time.monotonic() - started
  record = {"point": point.name, "overrides": tree.to_json(point.overrides),
            **result_record(metrics, seconds)}
  files.write_json(result_path, record)  # a result.json is either complete or absent
  return record


def run_sweep(config: ml_collections.ConfigDict, points: Sequence[Point], workdir: str,
              x_key: str = DEFAULT_X, overwrite: bool = False,
              columns: Sequence[str] | None = None, title: str = "") -> list[results.Row] | None:
  """Runs every point not yet finished, then writes the reports.

  Args:
    config: the base config.
    points: from `make_points`.
    workdir: the sweep's directory.
    x_key: the key `plot` puts on the x-axis.
    overwrite: see `prepare`.
    columns: see `prepare`.
    title: see `prepare`.

  Returns:
    The rows of `collect`; None when a point was preempted (run again).
  """
  workdir = os.path.abspath(workdir)
  prepare(config, points, workdir, x_key, overwrite, columns, title)
  check_start_weights(config, points, workdir)
  for point in points:
    if run_point(config, point, workdir) is None:
      return None
  rows, _ = results.write_reports(workdir, x_key)
  return rows


def select_point(points: Sequence[Point], index: int) -> Point:
  """`points[index]`, or a SweepError saying how many points there are."""
  if not 0 <= index < len(points):
    raise SweepError(f"--point {index} is out of range: this sweep has {len(points)} points, "
                     f"so use 0..{len(points) - 1} (--list prints them).")
  return points[index]


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
    `[".../python -m tlflax.main --config=/abs/file.py --workdir=/abs/dir ... --point=0", ...]`
  """
  path, colon, argument = config_arg.partition(":")
  base = [sys.executable, "-m", "tlflax.main", f"--config={os.path.abspath(path)}{colon}"
          f"{argument}", f"--workdir={os.path.abspath(workdir)}", *config_overrides]
  if x_key:
    base.append(f"--x={x_key}")
  return [shlex.join([*base, f"--point={index}"]) for index in range(count)]
