"""A run's workdir: what it holds, the config on record, and checks before writing.

    WORKDIR/config.json       the config of the run (written once by process 0)
    WORKDIR/checkpoints/      orbax checkpoints (`tlflax.training.checkpoint`)
    WORKDIR/metrics.jsonl     one JSON line per logged step (`tlflax.training.metrics`)
    WORKDIR/stages/<name>/    the state at the end of each stage of a staged run
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from tlflax import files

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


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
