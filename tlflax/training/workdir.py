"""A run's workdir: what it holds, the config on record, and checks before writing.

    WORKDIR/config.json       the config of the run (written once by process 0)
    WORKDIR/checkpoints/      orbax checkpoints (`tlflax.training.checkpoint`)
    WORKDIR/metrics.jsonl     one JSON line per logged step (`tlflax.training.metrics`)
    WORKDIR/stages/<name>/    the state at the end of each stage of a staged run
    WORKDIR/class_names.json  the classes the head predicts, in order
    WORKDIR/lock              held by the run that uses the workdir (see `lock`)
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
from typing import Any, Iterator, Sequence

import jax

from tlflax import files

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
CLASS_NAMES_FILE = "class_names.json"
LOCK_FILE = "lock"


class CheckpointError(ValueError):
  """A workdir or checkpoint that cannot be used, with what to do about it."""


def config_to_json(config: Any) -> str:
  """The config as indented, key-sorted JSON (ConfigDict or plain dict)."""
  if hasattr(config, "to_json_best_effort"):
    return config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
  return json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"


def write_config(workdir: str, config: Any, resumed_at: int | None = None) -> str:
  """Writes `WORKDIR/config.json` once; a resumed run never overwrites it.

  A resumed run with a different config writes
  `config.resumed_at_step_<N>.json` beside it, so both stay on record.
  Call from one process only.

  Returns:
    The path written (or the existing config.json when unchanged).
  """
  os.makedirs(workdir, exist_ok=True)
  text = config_to_json(config)
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return path
    path = os.path.join(workdir, f"config.resumed_at_step_{resumed_at or 0}.json")
    logger.warning("The config differs from %s; writing this run's to %s.",
                   os.path.join(workdir, CONFIG_FILE), path)
  files.write_text(path, text)
  return path


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
