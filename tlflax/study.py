"""A study: several runs from one config, in order, compared in one table.

A config with a `runs` list is a study. Each entry is a dict of dotted-key
overrides plus a `name`; the run trains in `WORKDIR/<name>`. An `init.weights`
of `"@<name>"` starts from the final parameters of an earlier run of the same
study. An entry with `seeds: [0, 1, 2]` runs once per seed (`<name>/seed<k>`)
and is reported as mean and sample standard deviation. A finished run is resumed at its last step, i.e. skipped, so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

log = logging.getLogger(__name__)


def run_config(config: ml_collections.ConfigDict, overrides: dict[str, Any],
               workdir: str) -> ml_collections.ConfigDict:
  """The base config with one run's overrides applied (keys must exist)."""
  run = ml_collections.ConfigDict(config.to_dict())
  if "runs" in run:  # a study's config; a sweep's has none
    del run["runs"]
  run.lock()
  for key, value in overrides.items():
    if key in ("name", "seeds"):
      continue
    parent, _, leaf = key.rpartition(".")
    node = run
    for part in filter(None, parent.split(".")):
      node = node[part]
    if leaf not in node:
      raise KeyError(f"Run {overrides.get('name')!r} overrides unknown key {key!r}.")
    node[leaf] = tuple(value) if isinstance(value, list) else value
  if run.init.weights.startswith("@"):
    run.init.weights = os.path.join(workdir, run.init.weights[1:])
    run.init.source = "workdir"
  return run


def run_study(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Runs every entry of `config.runs`; returns one result dict per run."""
  from tlflax import train  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(workdir)
  results = []
  for overrides in config.runs:
    overrides = dict(overrides)
    name = overrides["name"]
    seeds = overrides.get("seeds")
    runs = []
    for seed in (seeds if seeds else [None]):
      run_overrides = dict(overrides) if seed is None else {**overrides, "seed": seed}
      run_dir = os.path.join(workdir, name) if seed is None else os.path.join(
          workdir, name, f"seed{seed}")
      log.info("Study %s: run %r%s", workdir, name, "" if seed is None else f" seed {seed}")
      runs.append(train.train_and_evaluate(run_config(config, run_overrides, workdir), run_dir))
    results.append(summarise(name, runs))
  table = results_table(results, config.get("study_description", ""))
  print(table)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  return results


def summarise(name: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One result row: a run's metrics, or mean and std over its seeds."""
  accuracies = [100 * r["eval/accuracy"] for r in runs]
  return {"run": name, "start": runs[0].get("start", ""), "step": runs[0].get("step", ""),
          "seeds": len(runs), "accuracy_mean": float(np.mean(accuracies)),
          # The sample standard deviation, as the sweep reports use.
          "accuracy_std": float(np.std(accuracies, ddof=1)) if len(runs) > 1 else 0.0,
          "accuracies": accuracies,
          "loss_mean": float(np.mean([r["eval/loss"] for r in runs]))}


def results_table(results: Sequence[dict[str, Any]], title: str = "") -> str:
  lines = [f"{title}\n" if title else "",
           "| run | start | steps | seeds | eval accuracy (%) | per seed | eval loss |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    spread = f" ± {r['accuracy_std']:.1f}" if r["seeds"] > 1 else ""
    lines.append(f"| {r['run']} | {r['start']} | {r['step']} | {r['seeds']} | "
                 f"{r['accuracy_mean']:.1f}{spread} | "
                 f"{', '.join(f'{a:.1f}' for a in r['accuracies'])} | {r['loss_mean']:.3f} |")
  return "\n".join(line for line in lines if line)
