"""Devices, meshes and multi-host start-up.

tlflax trains data-parallel over a one-axis mesh of every device of every
process: parameters and optimizer state are replicated, the global batch is
split along its first axis. A jitted step with these shardings computes
BatchNorm statistics over the global batch (XLA inserts the all-reduce).
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

DATA_AXIS = "data"


def initialize_distributed(config) -> None:
  """Starts `jax.distributed` when asked to, before any other JAX call.

  With `config.enabled` and no address, JAX reads the cluster's environment
  (SLURM, TPU pods, ...); otherwise the coordinator address, process count and
  id come from the config (e.g. for two processes on one machine).
  """
  if not config.get("enabled", False):
    return
  options = {}
  if config.get("coordinator_address"):
    options = dict(coordinator_address=config.coordinator_address,
                   num_processes=int(config.num_processes), process_id=int(config.process_id))
  log.info("Starting jax.distributed %s", options or "from the cluster environment")
  if config.get("cpu_collectives"):
    # CPU processes exchange data through gloo (GPU and TPU use their own).
    jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
  jax.distributed.initialize(**options)
  log.info("Process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
  """A one-axis mesh over every device of every process.

  The axis is `AxisType.Auto`, stated because `jax.make_mesh`'s default
  changed (JAX 0.9 made it `Explicit`). Our steps give shardings only at the
  `jax.jit` boundary (`in_shardings` / `out_shardings`) and leave the rest to
  the compiler, which shards the intermediates and inserts the collectives
  (the BatchNorm all-reduce over the global batch): that is the `Auto` model.
  Under `Explicit` the batch sharding is part of every intermediate's type,
  and an operation that moves data across the batch axis (indexing by
  example, sorting along it, contracting over it, a reshape that splits it)
  raises a `ShardingTypeError` at trace time unless it names an output
  sharding, in model and optimizer code we do not control.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, what: str = "batch_size") -> None:
  """The global batch must split evenly over devices (and so over processes)."""
  devices = jax.device_count()
  if global_batch_size % devices:
    raise ValueError(f"{what}={global_batch_size} does not divide over {devices} devices; "
                     f"use a multiple of {devices}.")


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's part of a global batch -> arrays sharded over the mesh."""
  sharding = batch_sharded(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}


def prefetch_to_mesh(local_batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
                     size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Places batches on the devices `size` ahead of the one being used.

  The transfers are asynchronous, so while the step on batch k runs, batches
  k+1 ... k+size are already being copied to (or sit on) the devices.

  Args:
    local_batches: this process's parts of global batches (numpy).
    mesh: the device mesh (see `to_global`).
    size: batches placed ahead (device memory: `size` extra batches).

  Yields:
    The batches as global arrays, in order.

  Examples:
    >>> for batch in prefetch_to_mesh(dataset.batches(epoch), mesh):
    ...   state, metrics = train_step(state, batch)
  """
  ahead: collections.deque = collections.deque()
  for local_batch in local_batches:
    ahead.append(to_global(local_batch, mesh))
    if len(ahead) > size:
      yield ahead.popleft()
  while ahead:
    yield ahead.popleft()


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree on every device (identical on every process)."""
  return jax.device_put(tree, replicated(mesh))


def host_copy(tree: Any) -> Any:
  """A numpy copy of a (replicated) pytree, on any process.

  Replicated arrays of a multi-process run are not fully addressable; every
  process holds a whole copy, so this process's first shard is the value.
  """
  def fetch(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return np.asarray(leaf.addressable_data(0))
    return np.asarray(leaf)
  return jax.tree.map(fetch, tree)
