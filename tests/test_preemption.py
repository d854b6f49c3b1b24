"""Preemption (preemption.py): SIGTERM becomes a flag the loop polls, then save and stop."""

import os
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_checkpoint import run_child
from tlflax.training import checkpoint, preemption


def read_until(child: subprocess.Popen, prefix: str) -> str:
  for line in child.stdout:
    if line.startswith(prefix):
      return line
  child.wait()
  raise AssertionError(f"child exited ({child.returncode}) before printing {prefix!r}")


def test_sigterm_lets_the_loop_save_and_exit_cleanly(tmp_path):
  child = run_child(f"""
      import time, jax.numpy as jnp
      from tlflax.training import checkpoint, preemption
      assert preemption.install_preemption_handler()
      ckpt = checkpoint.Checkpointer({str(tmp_path)!r})
      step = 0
      while not preemption.preemption_requested(step):
        step += 1
        if step == 3:
          print("training", flush=True)
        time.sleep(0.01)
      ckpt.save(step, {{"w": jnp.full((2,), float(step))}}, extra={{"preempted": True}})
      ckpt.close()
      print("stopped at", step, flush=True)
      """)
  try:
    read_until(child, "training")
    child.send_signal(signal.SIGTERM)
    stopped = read_until(child, "stopped at")
    assert child.wait(timeout=30) == 0
  finally:
    child.kill()
    child.stdout.close()
  step = int(stopped.split()[-1])
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == step
    state, extra = ckpt.restore({"w": jnp.zeros((2,))})
  assert extra == {"preempted": True}
  np.testing.assert_array_equal(state["w"], np.full((2,), step, np.float32))


@pytest.fixture(name="usr1")
def fixture_usr1():
  """SIGUSR1 with a recording Python handler; the handler and the flag restored afterwards."""
  received = []
  before = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
  preemption.reset_preemption()
  yield received
  signal.signal(signal.SIGUSR1, before)
  preemption._previous_handlers.pop(signal.SIGUSR1, None)  # pylint: disable=protected-access
  preemption.reset_preemption()


def test_the_first_signal_sets_the_flag_and_the_second_goes_to_the_old_handler(usr1):
  assert not preemption.preemption_requested() and not preemption.preemption_requested(3)
  assert preemption.install_preemption_handler(signals=(signal.SIGUSR1,))
  assert preemption.install_preemption_handler(signals=(signal.SIGUSR1,))  # twice: no loop
  os.kill(os.getpid(), signal.SIGUSR1)
  assert preemption.preemption_requested() and preemption.preemption_requested(7)
  assert usr1 == []  # the first signal is only a request to stop
  os.kill(os.getpid(), signal.SIGUSR1)
  assert usr1 == [signal.SIGUSR1]  # the second does what it would have done
  assert signal.getsignal(signal.SIGUSR1) is not preemption._on_signal  # pylint: disable=protected-access
  preemption.reset_preemption()
  assert not preemption.preemption_requested()


def test_uninstall_puts_the_old_handler_back_and_the_signal_names_the_status(usr1):
  handler = signal.getsignal(signal.SIGUSR1)
  assert preemption.install_preemption_handler(signals=(signal.SIGUSR1,))
  assert signal.getsignal(signal.SIGUSR1) is preemption._on_signal  # pylint: disable=protected-access
  assert preemption.received_signal() is None
  os.kill(os.getpid(), signal.SIGUSR1)
  assert preemption.received_signal() == "SIGUSR1" and usr1 == []
  preemption.uninstall_preemption_handler()
  assert signal.getsignal(signal.SIGUSR1) is handler
  preemption.reset_preemption()
  assert preemption.received_signal() is None and not preemption.preemption_requested()
  assert preemption.exit_status("SIGINT") == preemption.EXIT_INTERRUPTED == 130
  assert preemption.exit_status("SIGTERM") == preemption.EXIT_PREEMPTED == 75


def test_several_processes_leave_the_signal_to_jax_and_agree_on_a_step(usr1, monkeypatch):
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  handler = signal.getsignal(signal.SIGUSR1)
  assert not preemption.install_preemption_handler(signals=(signal.SIGUSR1,))
  assert signal.getsignal(signal.SIGUSR1) is handler  # nothing installed
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 5)
  assert [preemption.preemption_requested(s) for s in (4, 5, 6)] == [False, True, False]
  assert not preemption.preemption_requested()  # without a step there is nothing to agree on

  def disabled(step):
    raise RuntimeError("Preemption sync manager has not been initialized.")
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", disabled)
  assert not preemption.preemption_requested(5)
