"""A dataset that yields this process's share of deterministic global batches.

`tlflax.data.datasets.build` makes one from `config.data`:

    >>> train = datasets.build(config.data, split="train", training=True, global_batch_size=128,
    ...               seed=0, process_index=jax.process_index(),
    ...               process_count=jax.process_count())
    >>> for batch in train.batches(epoch=3, start_batch=17):
    ...   batch["image"], batch["label"]     # uint8 (64, H, W, 3), int32 (64,) on 2 processes
    >>> images = train.device_transform()(batch["image"])  # in the jitted step: float32

Everything a batch holds is a pure function of (seed, epoch, batch number):

* training order: a permutation of the examples drawn from (seed, epoch);
  global batch `b` is positions `b * B ... (b + 1) * B - 1` of it and the
  remainder is dropped;
* augmentation: drawn per example from (seed, epoch, example id) with a
  counter-based generator (`transforms.stateless_uniform`);
* process `p` of `P` takes rows `p * B / P ... (p + 1) * B / P - 1` of every
  global batch, so the concatenation of all processes' parts is the batch a
  single process would see.

So `batches(epoch, start_batch=k)` resumes exactly where an interrupted run
stopped, and the number of processes never changes what the model is trained
on. Evaluation goes through the examples in order; the last batch is padded
to full size and `mask` marks the real examples (1) and the padding (0).

A file that cannot be decoded (cut short, corrupt) stops the run with its
name, unless `config.data.skip_bad_files=True`. Then it is skipped wherever
it is decoded (in this process, its threads, or Grain's worker processes),
named in one warning, and batches carry `skipped`, int32 (local_batch,), 1 on
its rows:

* in training, its row takes the next example of the epoch's order that
  decodes (wrapping around at the end), with the row's own augmentation
  draws, so the batch stays full and a pure function of (seed, epoch, step):
  a resumed run reads the same batches. That example trains twice in the
  epoch (in two different views).
* in evaluation, its row is left out (`mask` 0): the evaluation covers fewer
  examples, and the training loop reports how many it left out
  (`skipped_files` in the eval metrics) beside the accuracy over the rest.

Images leave the host as uint8, a quarter of the bytes of float32;
`device_transform()` is what the jitted step applies to them on the device
(scaling and mean/std normalisation, `images.normalize_on_device`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
from typing import Any, Callable, Iterator

import numpy as np

from tlflax.data import images as image_files
from tlflax.data import shared_blocks
from tlflax.data import sources
from tlflax.data import transforms

log = logging.getLogger(__name__)

# Worker processes are used for streams of at least this many images: each
# starts in a few seconds (a fresh interpreter importing numpy, PIL and
# tlflax), which threads in this process do not pay; shorter streams (small
# evaluation sets, tests) are quicker on threads.
MIN_IMAGES_FOR_PROCESSES = 2048
# Batches each worker process holds ready in its queue to this process.
WORKER_BUFFERED_BATCHES = 2
# Tags that keep the random streams of different purposes apart for one seed.
_SHUFFLE_STREAM = 1
_FEW_SHOT_STREAM = 2
# Batch keys that carry the files that failed to decode (with
# skip_bad_files) from wherever a batch is made to `Dataset._report_failures`.
_FAILED_IDS, _FAILED_MESSAGES = "failed_example_ids", "failed_example_messages"


class _GlobalBatch:
  """`dataset._global_batch` as a picklable callable for Grain's worker processes.

  Each worker writes the images into its own reused shared-memory blocks
  (`shared_blocks`), and Grain carries only the blocks' names: a batch of
  ordinary arrays would be copied into a new block of shared memory, paid for
  page by page, for every batch.
  """

  def __init__(self, dataset: "Dataset"):
    self.dataset = dataset
    self.blocks = None  # made in the worker process, on its first batch

  def __call__(self, step: int) -> shared_blocks.SharedBatch:
    if self.blocks is None:
      self.blocks = shared_blocks.WorkerBlocks()
    batch = self.dataset._global_batch(  # pylint: disable=protected-access
        int(step), allocate=self.blocks.empty)
    return self.blocks.share(batch)


def _absl_flags_for_grain() -> None:
  """Grain reads its settings from absl flags, which must count as parsed.

  tlflax's command lines parse their own flag sets, and a notebook parses
  none; marking the global set parsed keeps every flag at its default.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# eq=False: fields hold arrays, which have no single truth value to compare by.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split, batched for one process.

  Attributes:
    num_examples: examples in the split (all processes together; after the
      few-shot subset for training data).
    num_classes, class_names: the label set; labels are 0..num_classes-1.
    steps_per_epoch: global batches per epoch: num_examples // batch size
      when training (remainder dropped), rounded up for evaluation.
    global_batch_size: examples per step over all processes.
    local_batch_size: rows of each batch this process yields.
    training: shuffled and augmented (True) or in order, padded and masked.
    skip_bad_files: skip files that fail to decode instead of stopping (see
      the module docstring for what takes their place).
  """
  num_examples: int
  num_classes: int
  class_names: tuple[str, ...]
  steps_per_epoch: int
  global_batch_size: int
  local_batch_size: int
  training: bool
  image_size: int
  augment: str
  seed: int
  process_index: int
  process_count: int
  source: sources.ExampleSource = dataclasses.field(repr=False)
  # Source index of each example of this dataset (a subset for few-shot).
  example_ids: np.ndarray = dataclasses.field(repr=False)
  preprocessing: image_files.Preprocessing = dataclasses.field(repr=False)
  # Threads that decode and transform examples; 1 = a plain loop.
  num_threads: int = 1
  # Worker processes (Grain) that prepare whole batches; 0 = this process.
  num_workers: int = 0
  skip_bad_files: bool = False
  # Example ids whose failure was already reported (in the process that reads batches).
  reported_failures: set = dataclasses.field(default_factory=set, repr=False)

  def batches(self, epoch: int = 0, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of global batches `start_batch`... of `epoch`.

    Args:
      epoch: selects the shuffle and augmentation (ignored for evaluation).
      start_batch: the first batch to yield, to resume inside an epoch.

    Yields:
      {"image": uint8 (local_batch, H, W, 3), "label": int32 (local_batch,)}
      plus "mask": float32 (local_batch,) for evaluation, and "skipped":
      int32 (local_batch,) with `skip_bad_files`. The step applies
      `device_transform()` to the images.
    """
    if not 0 <= start_batch <= self.steps_per_epoch:
      raise ValueError(f"start_batch {start_batch} is outside 0..{self.steps_per_epoch}.")
    first = epoch * self.steps_per_epoch
    return self.stream(first + start_batch, first + self.steps_per_epoch)

  def stream(self, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
    """The batches of global steps `start` ... `stop - 1`, across epochs.

    Step `s` is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`,
    so a training loop reads one stream from its first step to its last,
    and a resumed one from the step it stopped at. Batches are prepared
    ahead: by `num_workers` worker processes (Grain) when set and the stream
    is long enough to repay starting them, else by `num_threads` threads of
    this process, one batch ahead.

    Args:
      start: the global step number of the first batch, 0 <= start <= stop.
      stop: the global step number after the last batch.

    Yields:
      The batches, as `batches` describes them.
    """
    if not 0 <= start <= stop:
      raise ValueError(f"Need 0 <= start <= stop, got {start} and {stop}.")
    return self._reported(self._stream(start, stop))

  def _reported(self, batches: Iterator[dict[str, np.ndarray]]
                ) -> Iterator[dict[str, np.ndarray]]:
    """`batches` with their failed files reported; closing it closes `batches` (and workers)."""
    try:
      for batch in batches:
        yield self._report_failures(batch)
    finally:
      close = getattr(batches, "close", None)
      if close is not None:
        close()

  def _report_failures(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Warns once per file that failed to decode while `batch` was made; removes their keys."""
    ids, messages = batch.pop(_FAILED_IDS, ()), batch.pop(_FAILED_MESSAGES, ())
    for example_id, message in zip(ids, messages):
      if int(example_id) in self.reported_failures:
        continue
      self.reported_failures.add(int(example_id))
      instead = ("Training rows that hold it take the next example of the epoch's order that "
                 "decodes; counted as skipped_files in the train metrics." if self.training else
                 "Evaluation leaves it out and covers fewer examples; counted as skipped_files "
                 "in the eval metrics.")
      log.warning("Skipping a file that fails to decode (data.skip_bad_files=True): %s. %s",
                  message, instead)
    return batch

  def _stream(self, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
    """`stream` after its checks: worker processes or threads, whichever repays itself."""
    images = (stop - start) * self.local_batch_size
    if self.num_workers > 0 and images >= MIN_IMAGES_FOR_PROCESSES:
      return self._stream_in_processes(start, stop)
    return self._stream_in_threads(start, stop)

  def _stream_in_threads(self, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
    with concurrent.futures.ThreadPoolExecutor(1) as ahead, \
         concurrent.futures.ThreadPoolExecutor(self.num_threads) as workers:
      pending = None
      try:
        for step in range(start, stop):
          if pending is None:
            pending = ahead.submit(self._global_batch, step, workers)
          current = pending.result()
          pending = (ahead.submit(self._global_batch, step + 1, workers)
                     if step + 1 < stop else None)
          yield current
      finally:
        if pending is not None:
          pending.cancel()

  def _stream_in_processes(self, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
    # Grain runs `_global_batch` in worker processes and returns the batches
    # in step order; each batch is a pure function of its step, so the number
    # of workers never changes a batch, and resuming needs no iterator state.
    import grain  # pylint: disable=import-outside-toplevel
    _absl_flags_for_grain()
    steps = grain.MapDataset.range(start, stop).map(_GlobalBatch(self))
    # Each worker makes one batch at a time in its own main loop (no thread
    # pool, no buffer before its queue). Grain's default read options (16
    # threads, 500 elements per process) would run 16 whole batches at once in
    # every worker, on cores `num_workers` did not ask for; and a batch in a
    # thread's buffer would be one more block in use.
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    iterator = iter(steps.to_iter_dataset(read_options).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=self.num_workers,
                                     per_worker_buffer_size=WORKER_BUFFERED_BATCHES)))
    reader = shared_blocks.MainReader()
    try:
      for sent in iterator:
        yield reader.take(sent)
    finally:
      iterator.close()
      reader.close()

  def _global_batch(self, step: int, workers=None, allocate=np.empty) -> dict[str, np.ndarray]:
    epoch, batch = divmod(step, self.steps_per_epoch)
    return self._batch(epoch, batch, workers, allocate)

  def device_transform(self) -> Callable[[Any], Any]:
    """The function the jitted step applies to `batch["image"]` on the device.

    Returns:
      uint8 images -> float32, normalised with this dataset's `preprocessing`
      (`images.normalize_on_device`).
    """
    return functools.partial(image_files.normalize_on_device, preprocessing=self.preprocessing)

  def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """Batch `step` of `epoch` alone, as `batches` yields it.

    Args:
      epoch: as in `batches`.
      step: global batch number, 0..steps_per_epoch-1.

    Returns:
      The batch dict.
    """
    if not 0 <= step < self.steps_per_epoch:
      raise ValueError(f"step {step} is outside 0..{self.steps_per_epoch - 1}.")
    return self._report_failures(self._batch(epoch, step, None))

  def _rows(self, step: int) -> np.ndarray:
    """Where this process's rows of global batch `step` sit in the epoch's order."""
    first = step * self.global_batch_size + self.process_index * self.local_batch_size
    return np.arange(first, first + self.local_batch_size)

  def _positions(self, epoch: int, step: int) -> np.ndarray:
    """Positions in `example_ids` of this process's rows of a global batch (-1 = padding)."""
    rows = self._rows(step)
    if self.training:
      return epoch_order(self.num_examples, self.seed, epoch)[rows]
    return np.where(rows < self.num_examples, rows, -1)

  def _batch(self, epoch: int, step: int, workers, allocate=np.empty) -> dict[str, np.ndarray]:
    """This process's rows of a global batch; `allocate(shape, dtype)` makes the image array."""
    positions = self._positions(epoch, step)
    real = positions >= 0
    ids = self.example_ids[positions[real]]
    raws, labels = self.source.read(ids)
    labels = np.array(labels)  # a copy: a row that replaces a bad file takes another's label
    if self.training:
      uniforms = transforms.stateless_uniform(
          (self.seed, epoch), ids, transforms.num_draws(self.augment))
    else:
      uniforms = [None] * len(ids)
    work = list(zip(raws, uniforms))
    if workers is not None and self.num_threads > 1 and len(work) > 1:
      pixels = list(workers.map(lambda item: self._example_or_error(*item), work))
    else:
      pixels = [self._example_or_error(*item) for item in work]

    # Files that failed to decode: an error naming the first, or skipped.
    failed = {int(ids[k]): p for k, p in enumerate(pixels) if isinstance(p, image_files.ImageError)}
    if failed and not self.skip_bad_files:
      example_id, error = next(iter(failed.items()))
      raise image_files.ImageError(
          f"{self._failure_message(example_id, error)}. Replace or remove it, or set "
          "config.data.skip_bad_files=True to skip files that fail to decode (each is named "
          "in a warning and counted in the metrics).") from error
    skipped = np.zeros((self.local_batch_size,), np.int32)
    rows = np.flatnonzero(real)
    for k, row in enumerate(rows):
      if not isinstance(pixels[k], image_files.ImageError):
        continue
      skipped[row] = 1
      if self.training:
        pixels[k], labels[k] = self._replacement(epoch, self._rows(step)[row], uniforms[k],
                                                 failed)
      else:
        real[row] = False
    kept = [k for k, row in enumerate(rows) if real[row]]

    size = self.image_size
    images = allocate((self.local_batch_size, size, size, 3), np.uint8)
    for k in kept:
      images[rows[k]] = pixels[k]
    images[~real] = 0  # padding (`allocate` may hand out a former batch's memory)
    all_labels = np.zeros((self.local_batch_size,), np.int32)
    all_labels[rows[kept]] = labels[kept]
    batch = {"image": images, "label": all_labels}
    if not self.training:
      batch["mask"] = real.astype(np.float32)
    if self.skip_bad_files:
      batch["skipped"] = skipped
    if failed:
      batch[_FAILED_IDS] = np.asarray(list(failed), np.int64)
      batch[_FAILED_MESSAGES] = np.asarray(
          [self._failure_message(i, e) for i, e in failed.items()], str)
    return batch

  def _example_or_error(self, raw: Any, uniforms: np.ndarray | None):
    """The prepared example, or the `ImageError` of a file that fails to decode."""
    try:
      if self.training:
        return self._train_example(raw, uniforms)
      return self._eval_example(raw, None)
    except image_files.ImageError as error:
      return error

  def _replacement(self, epoch: int, order_row: int, uniforms: np.ndarray,
                   failed: dict[int, image_files.ImageError]) -> tuple[np.ndarray, int]:
    """The next example after `order_row` in the epoch's order that decodes, and its label.

    It is prepared with the replaced row's augmentation draws (`uniforms`), so
    it is another view than the one it has at its own place. Files found bad
    on the way are added to `failed`.
    """
    order = epoch_order(self.num_examples, self.seed, epoch)
    for offset in range(1, self.num_examples):
      candidate = int(self.example_ids[order[(order_row + offset) % self.num_examples]])
      if candidate in failed:
        continue
      raws, labels = self.source.read([candidate])
      pixels = self._example_or_error(raws[0], uniforms)
      if not isinstance(pixels, image_files.ImageError):
        return pixels, int(labels[0])
      failed[candidate] = pixels
    raise image_files.ImageError(
        f"None of the {self.num_examples} training examples could be decoded, e.g. "
        f"{self._failure_message(*next(iter(failed.items())))}. Check the data.")

  def _failure_message(self, example_id: int, error: image_files.ImageError) -> str:
    """The error of a file that failed to decode, naming the example when the error cannot."""
    message = str(error).rstrip(".")
    name = self.source.example_name(example_id)
    return message if name in message else f"{message} ({name})"

  def _train_example(self, raw: Any, uniforms: np.ndarray) -> np.ndarray:
    return transforms.train_transform(self.source.image(raw), uniforms, self.augment,
                                      self.image_size, self.preprocessing.resize_size)

  def _eval_example(self, raw: Any, unused) -> np.ndarray:
    del unused
    return transforms.eval_transform(self.source.image(raw), self.image_size,
                                     self.preprocessing.resize_size)


# Cached: every batch of an epoch reads the same order, and a fresh permutation
# of a million examples takes tens of milliseconds.
@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of one epoch: a permutation drawn from (seed, epoch).

  Args:
    num_examples: examples in the dataset.
    seed: the run's seed.
    epoch: the epoch number.

  Returns:
    int64 (num_examples,), read-only (it is shared through the cache).
  """
  order = np.random.default_rng([seed, _SHUFFLE_STREAM, epoch]).permutation(num_examples)
  order.flags.writeable = False
  return order


def few_shot_subset(labels: np.ndarray, per_class: int, num_classes: int, seed: int
                    ) -> np.ndarray:
  """A seeded choice of `per_class` examples of every class.

  Args:
    labels: int (N,) of the whole split.
    per_class: examples to keep per class.
    num_classes: classes in the dataset.
    seed: the run's seed; other seeds choose other examples.

  Returns:
    Sorted int64 indices into the split, per_class * num_classes of them.
  """
  rng = np.random.default_rng([seed, _FEW_SHOT_STREAM])
  chosen = []
  for label in range(num_classes):
    members = np.flatnonzero(labels == label)
    if len(members) < per_class:
      raise ValueError(f"train_examples_per_class={per_class}, but class {label} has only "
                       f"{len(members)} training examples.")
    chosen.append(rng.choice(members, size=per_class, replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)
