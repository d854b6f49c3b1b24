"""The mesh, the batch and state placement, and runs over several processes.

The multi-process tests start real `python -m tlflax.main` processes on this
machine (4 simulated CPU devices each, gloo between them) and compare them
with one process of 8 devices: once with an explicit coordinator, once the
way a SLURM cluster starts them, where each process learns its rank and its
peers from the environment alone.
"""

import os
import random
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType

from conftest import metric_lines, with_device_count
from tlflax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and fast: 16 images a batch (2 per device), logged at every step.
SMALL = ["--config.batch_size=16", "--config.eval_batch_size=32", "--config.log_every_steps=1",
         "--config.model.name=cifar_resnet20", "--config.num_train_steps=2",
         "--config.eval_every_steps=2"]
# A whole run: start-up and compilation dominate (~30 s alone, more when two
# processes share two cores). A missing peer makes JAX wait, then abort.
RUN_TIMEOUT_S = 300


# -- The mesh and the batch, in this process (8 simulated devices) ----------


def test_mesh_is_one_auto_axis_over_every_device():
  mesh = sharding.make_mesh()
  assert jax.device_count() == 8
  assert dict(mesh.shape) == {sharding.DATA_AXIS: 8}
  assert mesh.axis_names == ("data",)
  # Stated, not JAX's default (Explicit since JAX 0.9): see make_mesh.
  assert mesh.axis_types == (AxisType.Auto,)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_compiler_may_move_data_across_the_batch_axis():
  """The reason for Auto: a step that mixes examples (a permutation, as mixup
  does) compiles; on an Explicit mesh it is a ShardingTypeError."""
  mesh = sharding.make_mesh()
  batch = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  permutation = np.random.default_rng(0).permutation(16)
  mixed = jax.jit(lambda x: x[permutation] - x.mean(axis=0),
                  in_shardings=sharding.batch_sharded(mesh),
                  out_shardings=sharding.batch_sharded(mesh))
  result = mixed(sharding.to_global({"x": batch}, mesh)["x"])
  np.testing.assert_allclose(np.asarray(result), batch[permutation] - batch.mean(axis=0),
                             rtol=1e-6)


def test_check_batch_size():
  sharding.check_batch_size(16)
  sharding.check_batch_size(8)
  with pytest.raises(ValueError, match="batch_size=12 does not divide over 8 devices; "
                     "use a multiple of 8"):
    sharding.check_batch_size(12)
  with pytest.raises(ValueError, match="eval_batch_size=4 does not divide"):
    sharding.check_batch_size(4, "eval_batch_size")


def test_to_global_and_host_copy_round_trip():
  mesh = sharding.make_mesh()
  local = {"image": np.random.default_rng(0).normal(size=(16, 4, 4, 3)).astype(np.float32),
           "label": np.arange(16, dtype=np.int64) % 5}
  placed = sharding.to_global(local, mesh)
  for key, value in placed.items():
    assert value.shape == local[key].shape
    assert value.sharding == sharding.batch_sharded(mesh)
    # Two consecutive examples on each device, in mesh order.
    shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start)
    assert [s.data.shape[0] for s in shards] == [2] * 8
    np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards]),
                                  local[key])
  np.testing.assert_array_equal(sharding.host_copy(placed)["image"], local["image"])

  tree = {"params": {"kernel": np.ones((3, 3), np.float32)}, "step": np.int32(7)}
  replicated = sharding.replicate(tree, mesh)
  assert replicated["params"]["kernel"].sharding == sharding.replicated(mesh)
  copied = sharding.host_copy(replicated)
  assert isinstance(copied["params"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(copied["params"]["kernel"], tree["params"]["kernel"])
  assert int(copied["step"]) == 7


def test_distributed_start_is_skipped_unless_enabled():
  sharding.initialize_distributed(ml_collections.ConfigDict({"enabled": False}))
  assert jax.process_count() == 1


# -- Several processes, as on a cluster -------------------------------------


def process_env(devices, **variables):
  """This environment for a child run: `devices` CPU devices, no cluster of ours.

  Variables of a cluster this test itself may run in (SLURM, Open MPI, JAX's
  own) are removed: JAX would read them and join that cluster instead.
  """
  env = {key: value for key, value in os.environ.items()
         if not key.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "JAX_COORDINATOR",
                                "JAX_LOCAL_DEVICE_IDS"))}
  env["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), devices)
  env.update(variables)
  return env


def start_main(workdir, log_path, env, *overrides):
  command = [sys.executable, "-m", "tlflax.main", f"--config={REPO}/configs/digits.py",
             f"--workdir={workdir}", *SMALL, *overrides]
  with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block a peer
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_all(processes, log_paths, timeout=RUN_TIMEOUT_S):
  """Waits for every process; kills the rest when one fails or time runs out.

  Returns:
    Each process's output.
  """
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    codes = [p.poll() for p in processes]
    if any(code not in (None, 0) for code in codes) or all(code == 0 for code in codes):
      break
    time.sleep(0.2)
  codes = [p.poll() for p in processes]  # None: still running
  for process in processes:  # the peer of a failed process would wait for it
    if process.poll() is None:
      process.kill()
    process.wait()
  outputs = [open(path).read() for path in log_paths]
  if any(code != 0 for code in codes):
    what = (f"timed out after {timeout} s" if all(code in (None, 0) for code in codes)
            else "failed")
    pytest.fail(f"{what} (exit codes {codes}; None: still running, killed)\n"
                + "\n".join(f"--- process {i}\n{out[-3000:]}" for i, out in enumerate(outputs)))
  return outputs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The reference: one process with 8 devices."""
  workdir = tmp_path_factory.mktemp("one_process")
  log = workdir / "log.txt"
  wait_all([start_main(workdir / "run", log, process_env(8))], [log])
  return metric_lines(workdir / "run")


def assert_first_step_agrees(one, two):
  """Two processes of 4 devices = one process of 8, up to float32 rounding.

  Step 1 is the same mathematics in both runs: the same initial parameters,
  the same global batch of 16 split alike over 8 devices (2 images each). It
  is not the same computation to the last bit: XLA's CPU runtime splits each
  device's work over threads by how many devices share the process (the two
  compiled programs differ only in such partition counts), which reblocks
  long sums (under --xla_cpu_max_isa=SSE4_2 the two-process gradient equals
  that of a 2-device mesh bit for bit, not the 8-device one's), and the
  all-reduces go through gloo. So the two differ by the float32 rounding of
  the step: at most the sum of each one's distance from the exact result.

  * The loss (forward pass only) is well conditioned: every float32 program
    we ran (1, 2, 4, 8 devices; default, SSE4.2 only, one core) is within
    5e-8 of float64, and the two runs within 1.6e-7 of each other; rel 1e-5
    leaves 60x.
  * The gradient norm is not: 37% of its square is in the convolution
    kernels' gradients, each a sum over the 16 x 32 x 32 = N positions of
    x * dy, where BatchNorm's backward pass makes dy sum to zero over the
    batch, so the terms cancel heavily (condition in the hundreds for
    post-ReLU x). A float32 sum in one long chain is off by about
    sqrt(N) * 2^-24 = 7.6e-6 times that condition: measured up to 1e-3 per
    kernel under SSE4.2 (3e-6 in the 8-device program, whose conv sums 2
    images a device), 2.4e-5 on the norm (1, 2 and 4-device programs; the
    two runs differ by exactly that), 1e-7 with the default instructions.
    Kernels off by 1.5e-3 (condition 200), all in the same direction, would
    move the norm by 0.37 x 1.5e-3 = 6e-4: rel 1e-3.
  Both bounds are far below what a broken run changes: normalising and
  averaging over 8 of the 16 images moves the loss by 17% and the gradient
  norm by 10%. Later steps start from parameters that already differ by
  rounding, which SGD amplifies, so they are only checked to be there.
  """
  assert one.keys() == two.keys() == {(1, "train"), (2, "train"), (2, "eval")}
  first_one, first_two = one[(1, "train")], two[(1, "train")]
  print("step-1 relative difference: loss "
        f"{abs(first_two['loss'] / first_one['loss'] - 1):.2e}, grad_norm "
        f"{abs(first_two['grad_norm'] / first_one['grad_norm'] - 1):.2e}")
  assert first_two["loss"] == pytest.approx(first_one["loss"], rel=1e-5, abs=0)
  assert first_two["grad_norm"] == pytest.approx(first_one["grad_norm"], rel=1e-3, abs=0)


def test_two_processes_train_together_like_one(tmp_path, one_process):
  """Two jax.distributed processes (4 CPU devices each), explicit coordinator."""
  port = free_port()
  logs = [tmp_path / f"process{i}.txt" for i in range(2)]
  processes = [
      start_main(tmp_path / "run", logs[i], process_env(4), "--config.distributed.enabled=True",
                 f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                 "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
      for i in range(2)]
  outputs = wait_all(processes, logs)
  for i, output in enumerate(outputs):
    assert f"Process {i} of 2, 4 local / 8 global devices" in output
  assert_first_step_agrees(one_process, metric_lines(tmp_path / "run"))


def test_two_processes_started_like_slurm_train_together_like_one(tmp_path, one_process):
  """Two processes that learn their rank and peers only from SLURM's variables.

  This is what `srun` gives each task and what `jax.distributed.initialize()`
  reads when called without arguments (jax/_src/clusters/slurm_cluster.py):
  SLURM_NTASKS (process count), SLURM_PROCID (rank), SLURM_LOCALID (rank on
  the node), SLURM_STEP_NODELIST (its first host is the coordinator) and
  SLURM_JOB_ID, from which every task derives the same coordinator port,
  61440 + job id mod 4096. Here the node list is "localhost" and the job id
  one that maps to a free port. tlflax is given no coordinator flags at all.
  (JAX also turns SLURM_LOCALID into local_device_ids, one GPU per task; it
  only restricts CUDA and ROCm devices, so on CPU each process keeps its 4.)
  """
  port = free_port(61440, 65535)
  job_id = 4096 * random.randint(1, 999) + port - 61440
  logs = [tmp_path / f"task{i}.txt" for i in range(2)]
  slurm = {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost",
           "SLURM_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "1"}
  processes = [
      start_main(tmp_path / "run", logs[i],
                 process_env(4, **slurm, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
                 "--config.distributed.enabled=True")
      for i in range(2)]
  outputs = wait_all(processes, logs)
  for i, output in enumerate(outputs):
    assert "Starting jax.distributed from the cluster environment" in output
    assert f"Process {i} of 2, 4 local / 8 global devices" in output
  assert_first_step_agrees(one_process, metric_lines(tmp_path / "run"))


def free_port(low=None, high=None):
  """A TCP port on 127.0.0.1 that is free now: any, or one in [low, high]."""
  for _ in range(200):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", 0 if low is None else random.randint(low, high)))
      except OSError:
        continue
      return s.getsockname()[1]
  raise RuntimeError(f"no free port in [{low}, {high}]")
