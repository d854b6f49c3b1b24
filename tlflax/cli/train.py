"""Training: `tlflax train --config FILE --workdir DIR` (also `python -m tlflax.main`).

    tlflax train --config configs/digits.py --workdir workdirs/digits
    tlflax train --config configs/digits.py --workdir workdirs/lr01 \\
        --config.optimizer.learning_rate=0.01 --config.num_epochs=2
    tlflax train --config configs/digits.py --config.batch_size=32 --print_config

`--config=FILE` is a Python file whose `get_config()` returns the run's
config; `configs/` holds one per experiment (`configs/digits.py` trains
offline in about a minute on a CPU). `--config.KEY=VALUE` overrides one key
of it, e.g. `--config.optimizer.learning_rate=0.01`: every key, with its
default and what it does, is in tlflax/defaults.py (the module
`tlflax.defaults`), and `--print_config` prints the resolved config (the
file with the overrides applied, as the JSON a run writes to
DIR/config.json) and exits without training. The config is locked, so a
misspelt key is an error that names the nearest key.

`--workdir=DIR` receives the run's checkpoints, metrics and config, trained
by `tlflax.training.train_and_evaluate`; the same command resumes the run
when DIR holds a checkpoint. A config file that also defines `sweep()` is a
sweep (see `tlflax.sweeps`): every point trains in `DIR/<point>`, finished
points are skipped, and `results.md`, `results.csv` and a plot are written
at the end. For a sweep: `--list`
prints one command per point (e.g. for a SLURM array, `--point
$SLURM_ARRAY_TASK_ID`), `--point N` runs that point only, `--collect` writes
the reports from the points finished so far, `--x KEY` sets the plot's
x-axis, `--overwrite` lets a workdir that holds a different sweep take this
one (finished points are never deleted).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from tlflax import defaults
from tlflax.cli import app
from tlflax.sweeps import points as points_lib
from tlflax.sweeps import results, runner
from tlflax.sweeps.results import DEFAULT_X, SweepError

PROGRAM = "tlflax.main"
_NAMES_SHOWN = 10  # --print_config of a sweep names this many points, then counts the rest


def define_flags(argv: Sequence[str]) -> flags.FlagValues:
  """The command's flags; `argv` names the `--config.KEY` overrides to define."""
  flag_values = app.new_flags()
  config_flags.DEFINE_config_file(
      "config", None, "A get_config() file (configs/ holds them; with sweep(): a sweep). "
      "--config.KEY=VALUE overrides a key, e.g. --config.optimizer.learning_rate=0.01; every "
      "key and its default: tlflax/defaults.py.",
      flag_values=flag_values, lock_config=True, sys_argv=[PROGRAM, *argv])
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (a sweep: one "
                      "sub-directory per point).", flag_values=flag_values)
  flags.DEFINE_bool("list", False, "Sweep: print one command per point (--point N) instead of "
                    "running.", flag_values=flag_values)
  flags.DEFINE_integer("point", None, "Sweep: run only this point (0-based), e.g. "
                       "$SLURM_ARRAY_TASK_ID.", flag_values=flag_values)
  flags.DEFINE_bool("collect", False, "Sweep: only write results.csv, results.md and the plot "
                    "from the points finished so far.", flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Sweep: redefine the sweep in a workdir that holds a "
                    "different one; finished points are kept.", flag_values=flag_values)
  flags.DEFINE_string("x", None, "Sweep: the setting on the plot's x-axis (default: the "
                      f"config's SWEEP_X, else {DEFAULT_X}).", flag_values=flag_values)
  flags.DEFINE_bool("print_config", False, "Print the resolved config (--config with the "
                    "--config.KEY overrides applied) as JSON and exit; needs no --workdir.",
                    flag_values=flag_values)
  # Required unless --print_config; absl's own wording, as mark_flag_as_required gives it.
  flags.register_validator(
      "workdir", lambda workdir: workdir is not None or flag_values["print_config"].value,
      message="Flag --workdir must have a value other than None.", flag_values=flag_values)
  return flag_values


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


def _print_reports(workdir: str) -> None:
  with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
    print(f.read(), end="")
  print(f"Written: {workdir}/results.csv, results.md and the plot.")


def _sweep_points(module, config, config_file: str) -> list[points_lib.Point]:
  """The points of a sweep config; its `sweep()` raising is one line naming its file and line."""
  try:
    overrides = module.sweep()
  except Exception as e:  # pylint: disable=broad-except
    raised = app.config_file_error(e, config_file.split(":", 1)[0])
    if raised is None:
      raise
    raise raised from e
  return points_lib.make_points(overrides, config)


def _print_config(values, module, config_file: str) -> int:
  """`--print_config`: the resolved config as JSON on stdout; a sweep's points on stderr."""
  from tlflax.training import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  print(workdir_lib.config_to_json(values.config), end="")
  if callable(getattr(module, "sweep", None)):
    points = _sweep_points(module, values.config, config_file)
    names = [point.name for point in points]
    shown = ", ".join(names[:_NAMES_SHOWN]) + (
        f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")
    print(f"This is the base config of a sweep of {len(points)} points (sweep() in "
          f"{config_file}); each point overrides some of its keys: {shown}. --list prints "
          "one command per point.", file=sys.stderr)  # stdout stays JSON, e.g. for jq
  return app.OK


def _train_one(values, workdir: str, program: str) -> int:
  if values.list or values.point is not None or values.collect or values.x:
    raise SweepError("--list, --point, --collect and --x are for sweeps; this config has no "
                     "sweep() function, so it is one run.")
  from tlflax import training  # pylint: disable=import-outside-toplevel
  result = training.train_and_evaluate(values.config, workdir)
  print(json.dumps(result, indent=1, default=str))
  if result.get("preempted"):
    return _stopped(program, result.get("signal"), f"step {result['step']}")
  return app.OK


def _stopped(program: str, signal_name: str | None, where: str) -> int:
  """Reports a run stopped by a signal after saving; returns its exit status."""
  from tlflax.training import preemption  # pylint: disable=import-outside-toplevel
  status = preemption.exit_status(signal_name)
  print(f"{app.error_name(program)}: stopped by {signal_name or 'SIGTERM'} at {where}, after "
        f"saving a checkpoint; run the same command again to resume (exit status {status}).",
        file=sys.stderr)
  return status


def _sweep(values, module, config_file: str, workdir: str, argv: Sequence[str],
           program: str) -> int:
  if values.list and values.point is not None:
    raise SweepError("Use --list or --point, not both.")
  if values.collect and (values.list or values.point is not None):
    raise SweepError("--collect only reads finished points: use it without --list and --point.")
  config = values.config
  x_key = values.x or getattr(module, "SWEEP_X", DEFAULT_X)
  reporting = dict(columns=getattr(module, "SWEEP_COLUMNS", None),
                   title=getattr(module, "SWEEP_TITLE", ""))
  points = _sweep_points(module, config, config_file)
  if values.collect:
    results.write_reports(workdir, values.x)
    _print_reports(workdir)
  elif values.list:
    runner.prepare(config, points, workdir, x_key, values.overwrite, **reporting)
    print("\n".join(runner.point_commands(config_file, workdir, len(points),
                                          config_overrides_from_argv(argv), values.x)))
  elif values.point is not None:
    point = runner.select_point(points, values.point)
    runner.prepare(config, points, workdir, x_key, values.overwrite, **reporting)
    runner.check_start_weights(config, [point], workdir, points)
    if runner.run_point(config, point, workdir) is None:
      return _stopped(program, _signal(), f"point {point.name}")
    print(f"Point {point.index} ({point.name}) finished. When every point has, run the "
          "same command with --collect instead of --point.")
  elif runner.run_sweep(config, points, workdir, x_key, values.overwrite,
                        **reporting) is None:
    return _stopped(program, _signal(), "an unfinished point")
  else:
    _print_reports(workdir)
  return app.OK


def _signal() -> str | None:
  from tlflax.training import preemption  # pylint: disable=import-outside-toplevel
  return preemption.received_signal()


def main(argv: Sequence[str] | None = None, program: str = PROGRAM) -> int:
  """Runs the command line (see the module docstring) as `program` (how the user typed it).

  Returns:
    The exit status.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  values = define_flags(argv)

  def body(_) -> int:
    if values.print_config:
      if values.config is None:
        raise SweepError("--print_config prints the config of --config=FILE: name the file.")
      config_file = values["config"].config_filename
      # A config that would be refused is refused here too: what is printed trains.
      defaults.check_config(values.config, where=config_file.split(":", 1)[0])
      return _print_config(values, points_lib.load_config_module(config_file), config_file)
    workdir = os.path.abspath(values.workdir)
    if values.collect and values.config is None:  # reports need no config
      results.write_reports(workdir, values.x)
      _print_reports(workdir)
      return app.OK
    if values.config is None:
      raise SweepError("--config is required (except with --collect).")
    config_file = values["config"].config_filename  # with its ":ARG", if any
    # A key the file sets by mistake, or a number out of range: refused before
    # anything is written.
    defaults.check_config(values.config, where=config_file.split(":", 1)[0])
    module = points_lib.load_config_module(config_file)
    if callable(getattr(module, "sweep", None)):
      return _sweep(values, module, config_file, workdir, argv, program)
    return _train_one(values, workdir, program)

  return app.run(program, values, body, argv, usage="--config=FILE --workdir=DIR "
                 "[--config.KEY=VALUE ...] [flags]", description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
