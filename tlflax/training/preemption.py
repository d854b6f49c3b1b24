"""Preemption and Ctrl-C: a signal becomes a flag the loop polls, so it saves and stops.

A cluster scheduler sends SIGTERM before it takes the machine, and a user
presses Ctrl-C (SIGINT); either way the loop saves a checkpoint at the
current step and returns, and the next start resumes from it. The command
line then exits with `EXIT_PREEMPTED` (SIGTERM) or `EXIT_INTERRUPTED`
(SIGINT), never 0, so a script that chains on success does not carry on
with an unfinished run, and a cluster requeue can key on the status.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax

logger = logging.getLogger(__name__)


# Exit statuses of a run stopped early, saved and resumable: EX_TEMPFAIL
# ("try again later") for a preemption, 128 + SIGINT as shells report Ctrl-C.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

_preempted = threading.Event()
_received: list[int] = []
_previous_handlers: dict[int, Any] = {}


def install_preemption_handler(signals=(signal.SIGTERM, signal.SIGINT)) -> bool:
  """Turns SIGTERM and SIGINT into a flag that `preemption_requested()` reports.

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
  logger.warning("Received %s: will save a checkpoint and stop.", signal.Signals(signum).name)
  _received.append(signum)
  _preempted.set()


def uninstall_preemption_handler() -> None:
  """Puts back the handlers `install_preemption_handler` replaced (after a run)."""
  for sig, previous in list(_previous_handlers.items()):
    if signal.getsignal(sig) is _on_signal:
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    del _previous_handlers[sig]


def received_signal() -> str | None:
  """"SIGTERM" or "SIGINT" once one was caught (the first), else None."""
  return signal.Signals(_received[0]).name if _received else None


def exit_status(signal_name: str | None) -> int:
  """The exit status of a run stopped by `signal_name` after saving."""
  return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


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
  _received.clear()
