"""Batches handed from worker processes in reused shared-memory blocks."""

import os
import types
from multiprocessing import shared_memory

import numpy as np
import pytest

from tlflax.data import shared_blocks


def exists(name):
  try:
    shared_memory.SharedMemory(name).close()
  except FileNotFoundError:
    return False
  return True


def make_batch(blocks, seed):
  rng = np.random.default_rng(seed)
  images = blocks.empty((3, 4, 5, 3), np.uint8)
  images[...] = rng.integers(0, 256, images.shape, np.uint8)
  return {"image": images, "label": rng.integers(0, 10, 3).astype(np.int32),
          "mask": np.ones(3, np.float32)}


def test_a_batch_arrives_whole_and_its_block_is_reused_once_taken():
  blocks, reader = shared_blocks.WorkerBlocks(), shared_blocks.MainReader()
  try:
    batch = make_batch(blocks, 0)
    expected = {key: value.copy() for key, value in batch.items()}
    sent = blocks.share(batch)
    assert sent.block.startswith(shared_blocks.block_name_prefix(os.getppid()))
    got = reader.take(sent)
    assert list(got) == ["image", "label", "mask"]
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
      assert got[key].dtype == expected[key].dtype
    # The main process holds a copy, and has removed the block's name.
    assert not np.shares_memory(got["image"], batch["image"])
    assert not exists(sent.block)
    # The next batch goes into the same block (it was marked free) ...
    second = make_batch(blocks, 1)
    assert blocks.share(second).block == sent.block
    np.testing.assert_array_equal(got["image"], expected["image"])  # the copy stays
    # ... and while that one is not taken, a third needs a new block.
    third = make_batch(blocks, 2)
    assert blocks.share(third).block != sent.block
  finally:
    blocks.remove_all()
    reader.close()


def test_blocks_the_main_process_never_mapped_are_removed_with_the_worker():
  blocks = shared_blocks.WorkerBlocks()
  names = [blocks.share(make_batch(blocks, seed)).block for seed in range(3)]
  assert len(set(names)) == 3 and all(exists(name) for name in names)
  blocks.remove_all()
  assert not any(exists(name) for name in names)


def test_share_needs_exactly_one_array_from_a_block():
  blocks = shared_blocks.WorkerBlocks()
  try:
    with pytest.raises(ValueError, match="must come from WorkerBlocks.empty"):
      blocks.share({"image": np.zeros((2, 2), np.uint8)})
  finally:
    blocks.remove_all()


def share_one_batch_and_exit(batches, received):
  """A worker process: shares a batch, waits until it is received, then exits,
  removing at exit (WorkerBlocks' finalizer) the names of the blocks it made."""
  blocks = shared_blocks.WorkerBlocks()
  batches.put(blocks.share(make_batch(blocks, 0)))
  received.wait(60)


def test_a_batch_received_before_its_worker_exits_can_be_taken_after():
  """Grain reads a worker's batches ahead into threads of the main process and
  stops the worker once it has read past the last one; the main process may
  take a buffered batch only after the worker has exited. Its block must still
  be there."""
  import multiprocessing  # pylint: disable=import-outside-toplevel
  context = multiprocessing.get_context("spawn")  # as Grain starts its workers
  batches, received = context.Queue(), context.Event()
  worker = context.Process(target=share_one_batch_and_exit, args=(batches, received))
  worker.start()
  reader = shared_blocks.MainReader()
  try:
    sent = batches.get(timeout=120)  # unpickled here: the batch has arrived
    received.set()
    worker.join(60)
    assert worker.exitcode == 0
    got = reader.take(sent)
    expected = make_batch(types.SimpleNamespace(empty=np.empty), 0)  # the same, in plain memory
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
    assert not exists(sent.block)  # no name left behind
  finally:
    received.set()
    reader.close()
