"""Random access into TFRecord files through an index of where each record starts.

A TFRecord file is a plain sequence of records, each framed as

    uint64 length | uint32 CRC of the length | `length` bytes | uint32 CRC of the bytes

(little-endian). Reading only the 12-byte headers and jumping over the data
finds every record's position without reading the data itself, so record `i`
of a file can then be read with one `os.pread`. That gives a TFRecord split
too large for memory the random access by example index that the pipeline
needs (every batch a pure function of seed, epoch and batch number), with no
conversion and no second copy on disk.

An index costs 16 bytes per record (ImageNet's 1.28 M training images: 20 MB)
and is kept in `$TLFLAX_CACHE_DIR/tfrecord_index`, keyed by the file's path,
size and modification time, so it is built once per file. The CRCs are not
checked: the record counts are, against the counts TFDS wrote in its metadata.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading

import numpy as np

from tlflax import files

_HEADER_BYTES = 12  # uint64 length + uint32 CRC of the length
_FOOTER_BYTES = 4   # uint32 CRC of the data


def index_dir() -> str:
  """Where record indexes are cached: `$TLFLAX_CACHE_DIR/tfrecord_index`."""
  return files.cache_dir("tfrecord_index")


def record_positions(path: str, cache: bool = True) -> np.ndarray:
  """Where every record of a local TFRecord file lies.

  Args:
    path: a local, uncompressed TFRecord file.
    cache: keep the index in `index_dir()` and reuse it while the file's path,
      size and modification time are unchanged.

  Returns:
    int64 (num_records, 2): the byte offset of each record's data and its length.

  Raises:
    ValueError: the file does not end where its last record ends (truncated,
      compressed, or not a TFRecord file).

  Examples:
    >>> positions = record_positions("/data/cifar10/3.0.2/cifar10-train.tfrecord-00000-of-00001")
    >>> offset, length = positions[7]
  """
  stat = os.stat(path)
  key = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
  cached = os.path.join(index_dir(), hashlib.sha256(key.encode()).hexdigest()[:32] + ".npy")
  if cache and os.path.exists(cached):
    return np.load(cached)
  positions = _scan(path, stat.st_size)
  if cache:
    with files.atomic_file(cached, "wb") as f:
      np.save(f, positions)
  return positions


def _scan(path: str, size: int) -> np.ndarray:
  """Reads the record headers of `path` one after another."""
  offsets, lengths = [], []
  with open(path, "rb") as f:
    descriptor = f.fileno()
    if hasattr(os, "posix_fadvise"):
      # Only a few bytes of each record are read: read-ahead would pull in the
      # whole file, which for a large split is exactly the cost this avoids.
      os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_RANDOM)
    position = 0
    while position + _HEADER_BYTES <= size:
      (length,) = struct.unpack("<Q", os.pread(descriptor, 8, position))
      offsets.append(position + _HEADER_BYTES)
      lengths.append(length)
      position += _HEADER_BYTES + length + _FOOTER_BYTES
  if position != size:
    raise ValueError(
        f"{path} is not a complete, uncompressed TFRecord file: its records end at byte "
        f"{position}, the file at byte {size}.")
  return np.stack([np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)], axis=1)


class IndexedRecords:
  """The records of chosen ranges of TFRecord files, by position: `records[i]` -> bytes.

  Thread-safe: `os.pread` takes its position as an argument, so threads share
  one descriptor per file without a lock around a seek. Picklable, for worker
  processes: a copy carries the paths and the index, and opens its own files.
  """

  def __init__(self, paths: list[str], positions: np.ndarray):
    self.paths = list(paths)
    self.positions = positions  # int64 (N, 3): file number, data offset, length
    self._descriptors: dict[int, int] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"paths": self.paths, "positions": self.positions}

  def __setstate__(self, state):
    self.__init__(state["paths"], state["positions"])

  @classmethod
  def from_shards(cls, shards: list[tuple[str, int, int, int]], how_to_prepare: str
                  ) -> "IndexedRecords":
    """Indexes `take` records from record `skip` of each shard, in order.

    Args:
      shards: (path, skip, take, expected number of records in the file) per
        file, as TFDS's file instructions give them.
      how_to_prepare: the command that prepares the dataset, for the errors.

    Returns:
      The chosen records, shard after shard.

    Raises:
      ValueError: a shard on a remote file system (no `pread` there), or one
        holding other than its expected number of records.
    """
    remote = [path for path, *_ in shards if "://" in path]
    if remote:
      raise ValueError(
          f"This TFRecord split is too large to read into memory, and its files are not on a "
          f"local disk ({remote[0]}), so they cannot be read by random access. Copy the "
          "prepared dataset to a local disk and set config.data.data_dir to it, or prepare "
          f"it as ArrayRecord, which is random access anywhere:\n    {how_to_prepare} "
          "--file_format=array_record")
    how_to_repair = (f"Prepare it again:\n    {how_to_prepare} --overwrite\n(or with "
                     "--file_format=array_record added, for random access without an index).")
    paths, rows = [], []
    for path, skip, take, expected in shards:
      try:
        positions = record_positions(path)
      except ValueError as error:
        raise ValueError(f"{error} {how_to_repair}") from error
      if len(positions) != expected:
        raise ValueError(
            f"{path} holds {len(positions)} records but the dataset's metadata counts "
            f"{expected}: the prepared files are incomplete or changed. {how_to_repair}")
      chosen = positions[skip:skip + take]
      rows.append(np.concatenate([np.full((len(chosen), 1), len(paths), np.int64), chosen],
                                 axis=1))
      paths.append(path)
    return cls(paths, np.concatenate(rows) if rows else np.zeros((0, 3), np.int64))

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, index: int) -> bytes:
    file_number, offset, length = (int(v) for v in self.positions[index])
    descriptor = self._descriptors.get(file_number)
    if descriptor is None:
      with self._lock:
        descriptor = self._descriptors.get(file_number)
        if descriptor is None:
          descriptor = os.open(self.paths[file_number], os.O_RDONLY)
          self._descriptors[file_number] = descriptor
    data = os.pread(descriptor, length, offset)
    if len(data) != length:
      raise OSError(f"{self.paths[file_number]} ended inside a record at byte {offset}: "
                    "the file changed after it was indexed. Restart to index it again.")
    return data

  def close(self) -> None:
    with self._lock:
      for descriptor in self._descriptors.values():
        os.close(descriptor)
      self._descriptors.clear()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      logging.getLogger(__name__).debug("Closing TFRecord files failed at exit.")
