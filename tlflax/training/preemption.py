"""Preemption: a signal becomes a flag the loop polls, so it saves and stops cleanly.

A cluster scheduler sends SIGTERM before it takes the machine; the loop then
saves a checkpoint at the current step and exits, and the next start resumes
from it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax

logger = logging.getLogger(__name__)


_preempted = threading.Event()
_previous_handlers: dict[int, Any] = {}


def install_preemption_handler(signals=(signal.SIGTERM,)) -> bool:
  """Turns SIGTERM into a flag that `preemption_requested()` reports.

  The training loop polls the flag, saves a final checkpoint and exits
  cleanly; a second signal ends the process the usual way. Call it from the
  main thread.

  In a multi-process run, SIGTERM is left to JAX's preemption service (which
  `jax.distributed.initialize` starts): every process must stop at the same
  step, which `preemption_requested(step)` agrees on.

  Args:
    signals: the signals to catch.

  Returns:
    True if handlers were installed (single process), False otherwise.
  """
  if jax.process_count() > 1:
    return False
  for sig in signals:
    previous = signal.signal(sig, _on_signal)
    if previous is not _on_signal:  # installing twice must not chain to itself
      _previous_handlers[sig] = previous
  return True


def _on_signal(signum, frame) -> None:
  if _preempted.is_set():  # second signal: do what it would have done
    previous = _previous_handlers.get(signum)
    # None: a handler not set from Python; the default is the safe stand-in.
    signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    os.kill(os.getpid(), signum)
    return
  logger.warning("Received signal %d: will save a checkpoint and stop.", signum)
  _preempted.set()


def preemption_requested(step: int | None = None) -> bool:
  """Whether the loop should save and stop now.

  Args:
    step: the current step. In a multi-process run pass it at every step on
      every process: JAX's preemption sync point then tells all processes to
      stop at the same step.

  Returns:
    True after SIGTERM (single process) or at the agreed step (multi-process).
  """
  if _preempted.is_set():
    return True
  if step is not None and jax.process_count() > 1:
    try:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    except RuntimeError:  # the preemption service is disabled
      return False
  return False


def reset_preemption() -> None:
  """Clears the flag (for tests and for code that handles a preemption itself)."""
  _preempted.clear()
