"""A run's workdir: what it holds, the config on record, and checks before writing.

    WORKDIR/config.json       the config of the run (written once by process 0)
    WORKDIR/config.resumed_at_step_<N>.json
                              the config of a run that resumed it at step N with
                              other settings (the latest one is in force)
    WORKDIR/checkpoints/      orbax checkpoints (`tlflax.training.checkpoint`)
    WORKDIR/metrics.jsonl     one JSON line per logged step (`tlflax.training.metrics`)
    WORKDIR/stages/<name>/    the state at the end of each stage of a staged run
    WORKDIR/class_names.json  the classes the head predicts, in order
    WORKDIR/result.json       a finished run's result (what train_and_evaluate returns)
    WORKDIR/training_curves.png  loss and accuracy against steps, at the end of a run
    WORKDIR/lock              held by the run that uses the workdir (see `lock`)

A run into a workdir that holds checkpoints is a rerun (`check_rerun`): a
finished run answers with its stored result if the settings are the same
and is refused if they differ; a run stopped mid-way resumes, with the
changed settings logged.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import socket
from typing import Any, Iterator, Sequence

import jax

from tlflax import files

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
CLASS_NAMES_FILE = "class_names.json"
LOCK_FILE = "lock"
STAGES_DIR = "stages"
_RESUMED_CONFIG = re.compile(r"^config\.resumed_at_step_(\d+)\.json$")

# Config keys that say where and how a run executes, not what it computes:
# `check_rerun` does not count them as changed settings (a finished run rerun
# with other values of them is the same run). Everything else counts, also
# what only changes what is recorded (log_every_steps, eval_every_steps...):
# a finished run cannot record it afterwards.
NOT_SETTINGS = {
    # Who decodes the images: a batch is a function of (seed, epoch, step).
    "data.num_workers",
    # How this job's processes find each other (an address changes with
    # every job); the global batch and the data order are the config's.
    "distributed.*",
    # Where and whether a frozen prefix's outputs are cached: the cache is
    # keyed by what it holds, and results equal the uncached run's up to
    # float rounding (tests/test_stages.py).
    "prefix_cache.*",
    # Where compiled programs are kept: a program read from the cache is the
    # one a fresh compile would make (tlflax.compilation).
    "compilation_cache.*",
}


class CheckpointError(ValueError):
  """A workdir or checkpoint that cannot be used, with what to do about it."""


def config_to_json(config: Any) -> str:
  """The config as indented, key-sorted JSON (ConfigDict or plain dict)."""
  if hasattr(config, "to_json_best_effort"):
    return config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
  return json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"


def write_config(workdir: str, config: Any, resumed_at: int | None = None) -> str:
  """Writes `WORKDIR/config.json` once; a resumed run never overwrites it.

  A resumed run whose config differs from the one in force (the latest
  record, see `config_record`) writes `config.resumed_at_step_<N>.json`
  beside it, so every config the run trained under stays on record, and the
  latest file is the config in force. Call from one process only.

  Returns:
    The path written (or the record in force when unchanged).
  """
  os.makedirs(workdir, exist_ok=True)
  text = config_to_json(config)
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    in_force = config_record_path(workdir)
    with open(in_force, encoding="utf-8") as f:
      if f.read() == text:
        return in_force
    path = os.path.join(workdir, f"config.resumed_at_step_{resumed_at or 0}.json")
    logger.info("The config differs from %s; writing this run's to %s.", in_force, path)
  files.write_text(path, text)
  return path


def config_record_path(workdir: str | os.PathLike) -> str:
  """The config in force: the latest `config.resumed_at_step_<N>.json`, else `config.json`."""
  workdir = os.fspath(workdir)
  resumed = [(int(match[1]), name) for name in os.listdir(workdir)
             if (match := _RESUMED_CONFIG.match(name))]
  return os.path.join(workdir, max(resumed)[1] if resumed else CONFIG_FILE)


def config_record(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The config in force in a workdir (see `config_record_path`) as a dict; None without one."""
  if not os.path.isfile(os.path.join(os.fspath(workdir), CONFIG_FILE)):
    return None
  return files.read_json(config_record_path(workdir))


def changed_settings(recorded: Any, config: Any) -> list[tuple[str, Any, Any]]:
  """The settings in which `config` differs from a recorded config, `NOT_SETTINGS` left out.

  Args:
    recorded: a config on record (a dict read from config.json), or a config.
    config: the new config (ConfigDict or dict).

  Returns:
    `[(dotted key, recorded value, new value), ...]` in key order, the values
    as JSON has them (tuples are lists); a key only one side has gets
    `MISSING` on the other. Lists of dicts of one length (the stages) are
    compared item by item (`stages[1].steps`), so the key that changed is named.
  """
  old, new = (json.loads(config_to_json(c)) for c in (recorded, config))  # as recorded
  return [change for change in _differences(old, new, "") if is_setting(change[0])]


def _differences(old: Any, new: Any, key: str) -> list[tuple[str, Any, Any]]:
  if isinstance(old, dict) and isinstance(new, dict):
    return [change for name in sorted(old.keys() | new.keys())
            for change in _differences(old.get(name, MISSING), new.get(name, MISSING),
                                       f"{key}.{name}" if key else name)]
  if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
      and all(isinstance(item, dict) for item in old + new)):
    return [change for index, (a, b) in enumerate(zip(old, new))
            for change in _differences(a, b, f"{key}[{index}]")]
  return [] if old == new else [(key, old, new)]


class _Missing:
  def __repr__(self) -> str:
    return "(not set)"


MISSING = _Missing()  # a key one of two configs does not have (see `changed_settings`)


def is_setting(key: str) -> bool:
  """Whether a dotted config key can change a run's results (it is not in `NOT_SETTINGS`)."""
  return not any(key == name or (name.endswith(".*") and key.startswith(name[:-1]))
                 for name in NOT_SETTINGS)


def describe_changes(changes: Sequence[tuple[str, Any, Any]], width: int = 60) -> str:
  """`changed_settings` as one line: `optimizer.learning_rate: 0.05 -> 0.5; data.name: ...`."""
  def shown(value):
    text = repr(value) if isinstance(value, (str, bool, _Missing)) or value is None else (
        json.dumps(value, separators=(", ", ": ")))
    return text if len(text) <= width else text[:width - 3] + "..."
  return "; ".join(f"{key}: {shown(old)} -> {shown(new)}" for key, old, new in changes)


def usable_workdir(workdir: str | os.PathLike) -> str:
  workdir = os.path.abspath(os.fspath(workdir))
  for path in (workdir, os.path.join(workdir, CHECKPOINT_DIR)):
    if os.path.exists(path) and not os.path.isdir(path):
      raise CheckpointError(f"{path} is a file, not a directory; choose another workdir "
                            "(checkpoints go to WORKDIR/checkpoints/).")
  return workdir


@contextlib.contextmanager
def lock(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds `WORKDIR/lock` for the block, so a workdir belongs to one run at a time.

  The lock is an exclusive `flock` on the file, which the operating system
  releases when the process ends however it ends, so a killed run never
  leaves a workdir locked. The file records who holds it, for the error of
  the run that is refused. In a multi-process run, process 0 holds it for all.

  Args:
    workdir: the run's directory (created if needed).

  Raises:
    CheckpointError: another run holds the workdir (naming it), or the
      workdir cannot be written.
  """
  if jax.process_index() != 0:
    yield
    return
  workdir = os.path.abspath(os.fspath(workdir))
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  except OSError as e:
    raise CheckpointError(f"Cannot write to the workdir {workdir} ({e.strerror or e}); choose "
                          "a --workdir you can write to.") from e
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      handle.seek(0)
      holder = handle.read().strip() or "a process that did not say which"
      raise CheckpointError(f"{workdir} is in use by another run ({holder}). Wait for it to "
                            "finish (or stop it), or use another --workdir.") from e
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
    handle.flush()
    yield
  finally:
    handle.close()  # closing releases the flock


def write_class_names(workdir: str, class_names: Sequence[str]) -> None:
  """Records the classes the run's head predicts, in order (for classifying later)."""
  path = os.path.join(workdir, CLASS_NAMES_FILE)
  names = [str(n) for n in class_names]
  if not os.path.exists(path) or files.read_json(path) != names:
    files.write_json(path, names)


def is_training_workdir(path: str | os.PathLike) -> bool:
  """Whether `path` is a training run's workdir (a config.json and checkpoints)."""
  path = os.fspath(path)
  return (os.path.isfile(os.path.join(path, CONFIG_FILE))
          and os.path.isdir(os.path.join(path, CHECKPOINT_DIR)))


def read_config(workdir: str | os.PathLike) -> dict[str, Any]:
  """The `config.json` of a workdir, as a nested dict."""
  return files.read_json(os.path.join(os.fspath(workdir), CONFIG_FILE))


def read_class_names(workdir: str | os.PathLike) -> list[str] | None:
  """The class names a training run recorded, or None (runs before they were recorded)."""
  path = os.path.join(os.fspath(workdir), CLASS_NAMES_FILE)
  return files.read_json(path) if os.path.exists(path) else None


def recorded_class_names(path: str | os.PathLike) -> list[str] | None:
  """The class names of the training run that `path` belongs to, or None where none are recorded.

  Args:
    path: a training run's workdir, its checkpoints directory, one step's
      directory, or a finished stage's directory (`WORKDIR/stages/<name>`,
      and the same below it): what `init.source="workdir"` accepts.
  """
  path = os.path.abspath(os.fspath(path))
  while True:
    names = read_class_names(path)
    if names is not None:
      return names
    parent, name = os.path.split(path)
    # Up from a run's own sub-directories only: never into an unrelated parent.
    if parent == path or not (name in (CHECKPOINT_DIR, STAGES_DIR) or os.path.basename(parent)
                              in (CHECKPOINT_DIR, STAGES_DIR)):
      return None
    path = parent


def check_rerun(config: Any, workdir: str, latest_step: int, total_steps: int
                ) -> dict[str, Any] | None:
  """What a run into a workdir that holds checkpoints does; checked before anything is written.

  * Finished (the latest checkpoint is at the run's last step) with the same
    settings: nothing to train; returns the stored result.
  * Finished with other settings (`changed_settings` against the config in
    force, `config_record`): refused, since its result answers the old settings.
  * Stopped mid-way: resumes, with new settings if given (a diverged run is
    resumed at a lower learning rate); the changed keys are logged.

  Args:
    config: the new run's config.
    workdir: the run's directory.
    latest_step: the step of its latest checkpoint.
    total_steps: the run's last step, as the latest checkpoint records it.

  Returns:
    The finished run's result (`train_and_evaluate`'s, with
    `"already_finished": True`), or None when there is training to do.

  Raises:
    CheckpointError: a finished run and other settings, listing each changed
      key (old -> new) and the two ways on.
  """
  recorded = config_record(workdir)
  changes = [] if recorded is None else changed_settings(recorded, config)
  if latest_step < total_steps:
    if changes:
      logger.warning("Resuming %s at step %d of %d with changed settings: %s.", workdir,
                     latest_step, total_steps, describe_changes(changes))
    return None
  if changes:
    raise CheckpointError(
        f"{workdir} holds a finished run (step {latest_step} of {total_steps}) with other "
        f"settings: {describe_changes(changes)}. Its result is that of its own settings; to "
        "train with these, use another --workdir, or start from this run in another workdir "
        f"with --config.init.weights={workdir} --config.init.source=workdir.")
  logger.info("%s has finished already (step %d of %d) with these settings: nothing to train. "
              "Its result:", workdir, latest_step, total_steps)
  return {**finished_result(workdir, latest_step), "already_finished": True}


def finished_result(workdir: str | os.PathLike, step: int) -> dict[str, Any]:
  """What `train_and_evaluate` returned when the run in `workdir` finished at `step`.

  Its `result.json` where the run wrote one; else rebuilt from what the
  checkpoints keep: the final evaluation saved with step `step`, for a
  staged run each finished stage's (in `WORKDIR/stages/<name>`), and how it
  started ("resumed" if it ever was, else from its recorded config).
  """
  # Imported here: checkpoint imports this module.
  from tlflax.training import checkpoint, metrics  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(os.fspath(workdir))
  path = os.path.join(workdir, metrics.RESULT_FILE)
  if os.path.isfile(path):
    stored = (files.read_json(path) or {}).get("metrics") or {}
    if stored.get("step") == step:
      return dict(stored)
  result = {"step": step, **checkpoint.saved_metrics(workdir, step)}
  # How the run started, as the loop says it: "resumed" if it ever was.
  recorded = config_record(workdir)
  if any(_RESUMED_CONFIG.match(name) for name in os.listdir(workdir)):
    result["start"] = "resumed"
  elif recorded is not None:
    result["start"] = "pretrained" if recorded.get("init", {}).get("weights") else "scratch"
  stages_dir = os.path.join(workdir, STAGES_DIR)
  stages = []
  for name in sorted(os.listdir(stages_dir)) if os.path.isdir(stages_dir) else ():
    end = checkpoint.latest_step_on_disk(os.path.join(stages_dir, name))
    if end is not None and end <= step:
      stages.append((end, name, checkpoint.saved_metrics(os.path.join(stages_dir, name), end)))
  if stages:
    result["stages"] = {name: stage_metrics for _, name, stage_metrics in sorted(stages)}
  return result
