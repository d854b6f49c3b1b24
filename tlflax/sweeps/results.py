"""A sweep's results read back: rows, results.csv, results.md and the plot.

`tlflax.sweeps.runner` runs the points; this module only reads what they left in the
sweep's workdir (`sweep.json` and one `<point>/result.json` per finished
point), so it works on any subset of finished points, and its table and CSV
functions (and the plots of `tlflax.sweeps.plots`) are pure and usable from a
notebook:

    rows = results.collect("workdirs/depth_sweep")
    print(results.markdown_table(rows))
    plots.plot(rows, "accuracy.png", x_key="freeze.rules")

The spread everywhere (tables, CSV summaries, the plots' error bars and
bands) is `mean_and_std`: the sample standard deviation over seeds (n - 1).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any, Sequence

import numpy as np

from tlflax import files
from tlflax.training.metrics import RESULT_FILE  # what a finished run leaves
from tlflax.tree import flatten_dotted

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"    # the sweep's points and base config
DEFAULT_X = "freeze.rules"   # the setting on the plot's x-axis
SEED_KEY = "seed"            # averaged over in the table and the plot
NAME_KEY = "name"            # a point's optional explicit name, not a setting
GROUP_KEY = "group"          # a point's optional table row, not a setting


class SweepError(ValueError):
  """A sweep config, point or workdir that cannot be used as it is."""


@dataclasses.dataclass(frozen=True)
class Row:
  """A finished point, as `collect` reads it back.

  `settings` holds every key the sweep varies, with this point's value: its
  override, or the base config's value where the point does not override it.
  """
  point: str
  settings: dict[str, Any]
  accuracy: float  # eval accuracy, a fraction
  loss: float
  steps: int
  wall_seconds: float  # NaN when unknown (result.json's null)
  start: str = ""  # "pretrained", "scratch" or "resumed"
  finished: str = ""
  group: str = ""  # the table row it is reported in ("" = by its settings)


def value_hash(value: Any) -> str:
  """A short stable hash of a JSON-able value (a tuple hashes as its list)."""
  text = json.dumps(value, sort_keys=True, default=repr)
  return hashlib.sha1(text.encode()).hexdigest()[:10]


def mean_and_std(values) -> tuple[float, float]:
  """The mean and the sample standard deviation (n - 1; 0 for a single value)."""
  values = np.asarray(values, dtype=np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def read_sweep(workdir: str) -> dict[str, Any]:
  """The contents of `workdir/sweep.json`: `points`, `config` and `x`."""
  path = os.path.join(workdir, SWEEP_FILE)
  if not os.path.exists(path):
    raise SweepError(f"{path} does not exist, so {workdir} is not a sweep's workdir. Run "
                     "`python -m tlflax.main --config FILE --workdir DIR` (or --list) first.")
  return files.read_json(path)


def collect(workdir: str) -> list[Row]:
  """The finished points of a sweep, in sweep order; unfinished ones are left out.

  Args:
    workdir: the sweep's directory.

  Returns:
    One `Row` per point with a result.json (`missing_points` names the
    others, and a warning lists them).
  """
  record = read_sweep(workdir)
  config = flatten_dotted(record["config"])
  swept = list(dict.fromkeys(key for p in record["points"] for key in p["overrides"]
                             if key not in (NAME_KEY, GROUP_KEY)))
  rows = []
  for entry in record["points"]:
    path = os.path.join(workdir, entry["name"], RESULT_FILE)
    if not os.path.exists(path):
      continue
    result = files.read_json(path)
    metrics = result["metrics"]
    settings = {key: entry["overrides"].get(key, config.get(key)) for key in swept}
    rows.append(Row(entry["name"], settings, float(metrics["eval/accuracy"]),
                    float(metrics["eval/loss"]), int(metrics.get("step", 0)),
                    _seconds(result["wall_seconds"]), str(metrics.get("start", "")),
                    result.get("finished", ""), str(entry["overrides"].get(GROUP_KEY, ""))))
  if len(rows) < len(record["points"]):
    missing = missing_points(workdir)
    log.warning("%d of %d points have not finished: %s", len(missing), len(record["points"]),
                ", ".join(missing))
  return rows


def _seconds(value: Any) -> float:
  """result.json's wall_seconds; null (a run time not known) becomes NaN."""
  return math.nan if value is None else float(value)


def missing_points(workdir: str) -> list[str]:
  """Names of the sweep's points that have no result.json yet."""
  return [entry["name"] for entry in read_sweep(workdir)["points"]
          if not os.path.exists(os.path.join(workdir, entry["name"], RESULT_FILE))]


def _csv_cell(value: Any) -> str:
  if isinstance(value, str):
    return value if value else '""'
  if isinstance(value, (list, dict)):
    return json.dumps(value)
  return str(value)


def write_csv(rows: Sequence[Row], path: str) -> None:
  """Writes one line per point: its name, each swept setting, accuracy, loss, steps, time.

  Settings are written as configured: an empty string as `""`, lists and
  dicts as JSON, a setting a row lacks as an empty cell. Accuracy is a fraction.

  Args:
    rows: from `collect`.
    path: the CSV file to write.
  """
  keys = list(dict.fromkeys(key for row in rows for key in row.settings))
  with files.atomic_file(path, newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["point", *keys, "eval_accuracy", "eval_loss", "steps", "wall_seconds",
                     "start", "finished"])
    for row in rows:
      cells = [_csv_cell(row.settings[k]) if k in row.settings else "" for k in keys]
      writer.writerow([row.point, *cells,
                       f"{row.accuracy:.6f}", f"{row.loss:.6f}", row.steps,
                       f"{row.wall_seconds:.1f}", row.start, row.finished])


def display_value(key: str, value: Any) -> str:
  """A short, readable form of a setting for tables and legends.

  Example: `display_value("init.weights", "")` is "scratch"; a list shows as
  a hash such as "#3f2a9c01".
  """
  if key.endswith("init.weights") and value == "":
    return "scratch"
  if isinstance(value, str):
    return value if len(value) <= 40 else f"{value[:30]}…{value_hash(value)[:6]}"
  if isinstance(value, (list, tuple, dict)):
    return f"#{value_hash(value)[:8]}"
  return str(value)


def group_rows(rows: Sequence[Row], exclude: Sequence[str]) -> dict[tuple, list[Row]]:
  """Rows grouped by their settings other than `exclude`, in order of appearance.

  Args:
    rows: from `collect`.
    exclude: settings that vary within a group, e.g. ("seed",).

  Returns:
    `{((key, value as JSON), ...): [rows]}`.
  """
  groups: dict[tuple, list[Row]] = {}
  for row in rows:
    key = tuple((k, json.dumps(v, sort_keys=True)) for k, v in row.settings.items()
                if k not in exclude)
    if row.group:  # an explicit row: its points are averaged whatever they vary
      key = ((GROUP_KEY, row.group),) + tuple(item for item in key
                                              if item[0] not in _varied_within(rows, row.group))
    groups.setdefault(key, []).append(row)
  return groups


def _varied_within(rows: Sequence[Row], group: str) -> set[str]:
  members = [r for r in rows if r.group == group]
  return {k for k in dict.fromkeys(k for r in members for k in r.settings)
          if len({json.dumps(r.settings.get(k), sort_keys=True) for r in members}) > 1}


def markdown_table(rows: Sequence[Row], missing: Sequence[str] = (), title: str = "",
                   columns: Sequence[str] | None = None) -> str:
  """Accuracy per row of the table: mean ± std over its seeds, and n.

  Points with a `group` form one row each group (named in a "run" column);
  the others are grouped by their settings other than the seed.

  Args:
    rows: from `collect`.
    missing: names of unfinished points, listed under the table.
    title: a line above the table.
    columns: the settings to show; None for every setting the points vary
      (the seed aside).

  Returns:
    Markdown text; accuracy in %, std the sample standard deviation (n - 1).
  """
  keys = list(columns) if columns is not None else [
      k for k in dict.fromkeys(k for row in rows for k in row.settings) if k != SEED_KEY]
  has_groups = any(row.group for row in rows)
  lines = [f"{title}\n"] if title else []
  header = (["run"] if has_groups else []) + [*keys, "n", "eval accuracy (%)", "per seed",
                                             "eval loss", "steps"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  for members in group_rows(rows, exclude=(SEED_KEY,)).values():
    accuracies = [100 * r.accuracy for r in members]
    mean, std = mean_and_std(accuracies)
    spread = f" ± {std:.1f}" if len(members) > 1 else ""
    cells = [members[0].group or members[0].point] if has_groups else []
    cells += [display_value(k, members[0].settings.get(k, "")) for k in keys]
    cells += [str(len(members)), f"{mean:.1f}{spread}", ", ".join(f"{a:.1f}" for a in accuracies),
              f"{np.mean([r.loss for r in members]):.3f}",
              "/".join(str(s) for s in sorted({r.steps for r in members}))]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  lines.append("\nMean ± sample standard deviation over the n seeds of each row.")
  if missing:
    lines.append(f"Not finished ({len(missing)}): {', '.join(missing)}.")
  return "\n".join(lines)


def write_reports(workdir: str, x_key: str | None = None) -> tuple[list[Row], list[str]]:
  """Writes results.csv, results.md and the plot from the points finished so far.

  The plot (`tlflax.sweeps.plots.write_plot`) is `accuracy_by_group.png`
  when points have a group (the demo's `seeded` points), else accuracy
  against `x_key`, `accuracy_vs_<x>.png`.

  Args:
    workdir: the sweep's directory.
    x_key: the plot's x-axis for points without groups; None for the one
      recorded in sweep.json.

  Returns:
    The rows, and the names of the points not finished yet.
  """
  record = read_sweep(workdir)
  x_key = x_key or record.get("x") or DEFAULT_X
  rows, missing = collect(workdir), missing_points(workdir)
  if not rows:
    raise SweepError(f"No point of the sweep in {workdir} has finished yet; nothing to collect "
                     f"({len(missing)} points to run).")
  write_csv(rows, os.path.join(workdir, "results.csv"))
  files.write_text(os.path.join(workdir, "results.md"),
                   markdown_table(rows, missing, record.get("title", ""), record.get("columns")) + "\n")
  # Imported here: plots imports this module.
  from tlflax.sweeps import plots  # pylint: disable=import-outside-toplevel
  try:
    plots.write_plot(rows, workdir, x_key, record.get("title", ""))
  except SweepError as e:
    log.warning("No plot: %s", e)
  return rows, missing
