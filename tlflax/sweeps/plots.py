"""A sweep's plot: accuracy by group, or against a swept setting.

Two kinds, chosen by the points (`write_plot`):

* points with a `group` (made by `seeded`, as in the demo): one position per
  group, its mean ± sample std over seeds as an error bar and every seed as
  a dot; `accuracy_by_group.png`.
* other points: accuracy against the setting `x_key` (a freeze-depth sweep:
  against the depth), one line per combination of the other settings, the
  mean with a ± std band and every seed as a dot; a series with a single x
  (a scratch baseline) is drawn across the axis; `accuracy_vs_<x>.png`.

Both are pure functions of `results.collect`'s rows, usable from a notebook:

    rows = results.collect("workdirs/demo")
    plots.plot_by_group(rows, "demo.png", title="Transfer to digits 5-9")

The spread is the one tlflax reports everywhere: the sample standard
deviation over seeds (`results.mean_and_std`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from typing import Any, Sequence

import numpy as np

from tlflax import files
from tlflax.sweeps.results import (DEFAULT_X, GROUP_KEY, SEED_KEY, Row, SweepError,
                                   display_value, group_rows, mean_and_std)

GROUP_PLOT_FILE = "accuracy_by_group.png"
Y_LABEL = "eval accuracy (%)"
# How to read the marks, above the axes.
GROUP_NOTE = "bar: mean ± sample std over seeds; dots: single seeds"
SERIES_NOTE = "line: mean over seeds, band: ± sample std; dots: single seeds"
_TITLE_CHARACTERS_PER_INCH = 14  # of a wrapped title at 10 points
_LABEL_WIDTH = 14  # characters per line of a wrapped tick label


# ----------------------------------------------------------------------------
# By group
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GroupResult:
  """One position of the by-group plot: a group's accuracies (%), one per seed."""
  name: str
  accuracies: list[float]

  @property
  def mean(self) -> float:
    return mean_and_std(self.accuracies)[0]

  @property
  def std(self) -> float:
    return mean_and_std(self.accuracies)[1]


def group_results(rows: Sequence[Row]) -> tuple[list[GroupResult], list[GroupResult]]:
  """The by-group plot's data: the groups, and the points without a group.

  Args:
    rows: from `results.collect`.

  Returns:
    (groups, others) in order of appearance, grouped as results.md's rows
    are. `others` (e.g. the demo's pretraining run, on another task) are
    named by their point (or their first point, for several seeds) and left
    off the plot's axis: a note under it gives their accuracy.
  """
  groups, others = [], []
  for members in group_rows(rows, exclude=(SEED_KEY,)).values():
    name = members[0].group or members[0].point
    entry = GroupResult(name, [100 * r.accuracy for r in members])
    (groups if members[0].group else others).append(entry)
  return groups, others


def tick_label(name: str, width: int = _LABEL_WIDTH) -> str:
  """`name` wrapped into lines of at most `width` characters, broken after `_` or `-`.

  Example: `tick_label("frozen_features")` is "frozen_\\nfeatures".
  """
  lines, line = [], ""
  for piece in re.findall(r"[^_\-]+[_\-]*|[_\-]+", name):
    if line and len(line) + len(piece) > width:
      lines.append(line)
      line = ""
    line += piece
  return "\n".join([*lines, line]) if line else "\n".join(lines)


def plot_by_group(rows: Sequence[Row], path: str, title: str = "") -> None:
  """Writes a PNG with one position per group: mean ± std error bar, a dot per seed.

  Args:
    rows: from `results.collect`; some must have a group.
    path: the PNG to write.
    title: what was compared (a sweep's SWEEP_TITLE); wrapped to fit.

  Raises:
    SweepError: no row has a group.
  """
  _save(by_group_figure(rows, title), path)


def by_group_figure(rows: Sequence[Row], title: str = ""):
  """The figure of `plot_by_group` (a matplotlib Figure; no pyplot, no global state).

  Tick labels are the group names (wrapped, with mean ± std and n under each;
  only the names, slanted, when many groups would collide); points without a
  group are listed under the axis.
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  groups, others = group_results(rows)
  if not groups:
    raise SweepError("No point has a group, so there is nothing to plot by group; give points "
                     "a 'group' (tlflax.sweeps.seeded does) or plot against a setting.")
  width = min(14.0, max(5.5, 1.1 * len(groups) + 2.0))  # inches
  # Characters that fit under each position (~11 per inch at 9 points).
  labels = [tick_label(g.name, max(_LABEL_WIDTH, int(11 * width / len(groups)) - 2))
            for g in groups]
  widest = max(len(line) for label in labels for line in label.splitlines())
  rotate = len(groups) * widest > 90  # would the labels collide side by side?
  if not rotate:  # the numbers under each name: readable without the table
    labels = [f"{label}\n{g.mean:.1f}" + (f" ± {g.std:.1f}" if len(g.accuracies) > 1 else "")
              + f"\nn={len(g.accuracies)}" for label, g in zip(labels, groups)]
  else:
    labels = [g.name for g in groups]
  figure = Figure(figsize=(width, 4.8), layout="constrained")
  axes = figure.add_subplot()
  jitter = np.random.default_rng(0)  # the same picture from the same results
  for position, group in enumerate(groups):
    # A color per group while colors are distinct; repeated ones would pair groups.
    color = f"C{position}" if len(groups) <= 10 else "C0"
    offsets = jitter.uniform(-0.15, 0.15, len(group.accuracies))
    axes.scatter(position + offsets, group.accuracies, s=14, color=color, alpha=0.55,
                 linewidths=0, zorder=2)
    # The mean a wide line, the std's ends short caps: they do not look alike.
    axes.errorbar([position], [group.mean], yerr=[group.std], fmt="_", markersize=30,
                  markeredgewidth=3, elinewidth=1.5, capsize=5, capthick=1.5, color=color,
                  zorder=3)
  axes.set_xticks(range(len(groups)), labels, fontsize=9)
  if rotate:
    axes.tick_params(axis="x", labelrotation=35)
    for label in axes.get_xticklabels():
      label.set_horizontalalignment("right")
      label.set_rotation_mode("anchor")
  axes.set_xlim(-0.6, len(groups) - 0.4)
  axes.set_ylabel(Y_LABEL)
  axes.grid(axis="y", alpha=0.3)
  _titles(figure, axes, title, GROUP_NOTE)
  if others:
    note = "Not on the axis (no group): " + "; ".join(
        f"{o.name} {o.mean:.1f}%" + (f" ± {o.std:.1f} (n={len(o.accuracies)})"
                                     if len(o.accuracies) > 1 else "") for o in others)
    # As the axis label: the layout keeps room for it below the ticks.
    axes.set_xlabel(textwrap.fill(note, int(12 * width)), fontsize=8, color="0.35")
  return figure


# ----------------------------------------------------------------------------
# Against a setting
# ----------------------------------------------------------------------------

def x_value(key: str, value: Any) -> Any:
  """Where a setting goes on the x-axis: a number, or the label of a categorical tick.

  For `freeze.rules`, `depth:K` is K, `linear_probe` is "probe" and `none`
  is "full" (fine-tuning everything); other specs are their own label.
  """
  if key.endswith("freeze.rules") and isinstance(value, str):
    name, _, argument = value.partition(":")
    if name == "depth" and argument.isdigit():
      return int(argument)
    return {"linear_probe": "probe", "none": "full", "full": "full"}.get(name, value)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return value
  return display_value(key, value)


@dataclasses.dataclass(frozen=True)
class Series:
  """One line of the plot: accuracies (%) over seeds at each x value."""
  label: str
  xs: list[Any]
  accuracies: list[list[float]]  # per x, one value per seed

  @property
  def means(self) -> list[float]:
    return [float(np.mean(a)) for a in self.accuracies]

  @property
  def stds(self) -> list[float]:
    return [mean_and_std(a)[1] for a in self.accuracies]


def plot_series(rows: Sequence[Row], x_key: str) -> list[Series]:
  """The plot's data: one series per combination of the settings other than x and seed.

  Args:
    rows: from `results.collect`.
    x_key: the setting on the x-axis, e.g. "freeze.rules".

  Returns:
    Series in order of appearance, with x values in order of appearance; a
    label names the settings that differ between series.
  """
  if not any(x_key in row.settings for row in rows):
    raise SweepError(f"No point sets {x_key!r}, so there is nothing to plot against; choose "
                     "the x-axis with --x=KEY or SWEEP_X in the config.")
  groups = group_rows(rows, exclude=(x_key, SEED_KEY))
  varying = [k for k in dict.fromkeys(k for key in groups for k, _ in key)
             if len({dict(key).get(k) for key in groups}) > 1]
  series = []
  for members in groups.values():
    by_x: dict[Any, list[float]] = {}
    for row in members:
      by_x.setdefault(x_value(x_key, row.settings.get(x_key)), []).append(100 * row.accuracy)
    settings = members[0].settings
    label = members[0].group or ", ".join(
        f"{k}={display_value(k, settings.get(k))}" for k in varying if k != GROUP_KEY)
    series.append(Series(label or "all points", list(by_x), list(by_x.values())))
  return series


def axis_ticks(series: Sequence[Series]) -> list[Any] | None:
  """Categorical x ticks in order of appearance; None when every x is a number.

  Series with a single x value are baselines (drawn across the axis) when
  others vary x, and then add no tick.
  """
  varied = [s for s in series if len(s.xs) > 1] or series
  xs = list(dict.fromkeys(x for s in varied for x in s.xs))
  if all(isinstance(x, (int, float)) for x in xs):
    return None
  return xs


def x_label(x_key: str) -> str:
  """The x-axis label: what a freeze depth counts, else the setting's key."""
  if x_key.endswith("freeze.rules"):
    return "freeze depth (stages frozen after the stem)"
  return x_key


def plot(rows: Sequence[Row], path: str, x_key: str = DEFAULT_X, title: str = "") -> None:
  """Writes a PNG of accuracy against `x_key`: the mean over seeds, a ± std band, each seed.

  A series with one x value (a baseline, such as training from scratch) is
  drawn as a horizontal line and band when other series vary x. The legend
  sits under the axes, inside the figure.

  Args:
    rows: from `results.collect`.
    path: the PNG to write.
    x_key: the setting on the x-axis.
    title: what was compared; default "eval accuracy vs <x>".
  """
  _save(series_figure(rows, x_key, title), path)


def series_figure(rows: Sequence[Row], x_key: str = DEFAULT_X, title: str = ""):
  """The figure of `plot` (a matplotlib Figure; no pyplot, no global state)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  series = plot_series(rows, x_key)
  ticks = axis_ticks(series)
  some_vary_x = any(len(s.xs) > 1 for s in series)
  figure = Figure(figsize=(6.4, 4.8), layout="constrained")
  axes = figure.add_subplot()
  for index, s in enumerate(series):
    color, seeds = f"C{index % 10}", max(len(a) for a in s.accuracies)
    lows = [m - d for m, d in zip(s.means, s.stds)]
    highs = [m + d for m, d in zip(s.means, s.stds)]
    if some_vary_x and len(s.xs) == 1:
      axes.axhline(s.means[0], color=color, linestyle="--",
                   label=f"{s.label} ({display_value(x_key, s.xs[0])}, n={seeds})")
      axes.axhspan(lows[0], highs[0], color=color, alpha=0.12, linewidth=0)
      continue
    positions = [ticks.index(x) for x in s.xs] if ticks else s.xs
    axes.plot(positions, s.means, marker="o", color=color, label=f"{s.label} (n={seeds})")
    axes.fill_between(positions, lows, highs, color=color, alpha=0.18, linewidth=0)
    for position, values in zip(positions, s.accuracies):
      axes.scatter([position] * len(values), values, color=color, s=10, alpha=0.5,
                   linewidths=0)
  if ticks:
    axes.set_xticks(range(len(ticks)), [str(t) for t in ticks])
  else:  # a tick at each number plotted (freeze depths are whole numbers)
    plotted = sorted({x for s in series if len(s.xs) > 1 or not some_vary_x for x in s.xs})
    if plotted and plotted[0] > 0 and plotted[-1] / plotted[0] >= 50:
      axes.set_xscale("log")  # e.g. learning rates over decades
    if len(plotted) <= 12:
      axes.set_xticks(plotted, [f"{x:g}" for x in plotted])
      axes.xaxis.set_minor_locator(_no_ticks())
  axes.set_xlabel(x_label(x_key))
  axes.set_ylabel(Y_LABEL)
  axes.grid(alpha=0.3)
  _titles(figure, axes, title or f"eval accuracy vs {x_label(x_key).split(' (')[0]}",
          SERIES_NOTE)
  if len(series) > 1 or series[0].label != "all points":
    figure.legend(loc="outside lower center", ncols=1 if len(series) > 3 else len(series),
                  fontsize=8, frameon=False)
  return figure


# ----------------------------------------------------------------------------
# Shared
# ----------------------------------------------------------------------------

def plot_path(workdir: str, x_key: str | None) -> str:
  """Where `write_plot` writes: `accuracy_by_group.png` for `x_key` None, else by the x.

  A freeze-depth axis (`freeze.rules`) gives `accuracy_vs_depth.png`, any
  other `accuracy_vs_<key with _ for .>.png`.
  """
  if x_key is None:
    return os.path.join(workdir, GROUP_PLOT_FILE)
  name = "depth" if x_key.endswith("freeze.rules") else x_key.replace(".", "_")
  return os.path.join(workdir, f"accuracy_vs_{name}.png")


def write_plot(rows: Sequence[Row], workdir: str, x_key: str = DEFAULT_X,
               title: str = "") -> str:
  """Writes the sweep's plot into `workdir`: by group if points have groups, else against x.

  Args:
    rows: from `results.collect`.
    workdir: the sweep's directory.
    x_key: the setting on the x-axis when no point has a group.
    title: what was compared (a sweep's SWEEP_TITLE).

  Returns:
    The PNG's path (see `plot_path`).
  """
  if any(row.group for row in rows):
    path = plot_path(workdir, None)
    plot_by_group(rows, path, title)
  else:
    path = plot_path(workdir, x_key)
    plot(rows, path, x_key, title)
  return path


def _no_ticks():
  from matplotlib.ticker import NullLocator  # pylint: disable=import-outside-toplevel
  return NullLocator()


def _titles(figure, axes, title: str, note: str) -> None:
  """The figure's title (wrapped to the figure's width) and, above the axes, how to read it."""
  if title:
    characters = int(_TITLE_CHARACTERS_PER_INCH * figure.get_figwidth())
    figure.suptitle(textwrap.fill(title, characters), fontsize=10)
  axes.set_title(note, fontsize=8, color="0.35")


def _save(figure, path: str) -> None:
  """Writes the figure as a PNG, atomically, with normal file permissions."""
  with files.atomic_file(path, "wb") as f:
    figure.savefig(f, format="png", dpi=120)
