"""NVIDIA DALI as the engine that decodes and transforms images (optional).

`config.data.engine` picks who turns files into batches:

    "pil"       Grain worker processes decode with PIL (the default; any host)
    "dali"      DALI decodes JPEGs on the GPU (nvJPEG) and resizes, crops and
                flips them there; needs an NVIDIA GPU and
                `pip install nvidia-dali-cuda120`
    "dali_cpu"  the same DALI graph on the host's cores (no GPU needed)

Everything else about a batch stays: it is a pure function of (seed, epoch,
batch number), because the random choices are tlflax's
(`transforms.stateless_uniform`, `transforms.random_resized_box`) and DALI
only carries them out; a stream resumes at any step; the process count never
changes a batch; evaluation batches are padded and masked. Batches arrive on
the host as uint8, as with "pil".

The pixels are DALI's. Its decoder gives PIL's pixels (equal on the files
tests/test_dali_engine.py checks) and the crop boxes and resize sizes are
torchvision's, but its resampling rounds differently from PIL's: a few
levels of 255 at most (see the README). Training and evaluation both go
through DALI, so they stay consistent with each other; a model evaluated on
"pil" batches sees images that differ by that much. Only JPEG files in RGB
or greyscale are accepted: DALI would treat transparency, CMYK and 16-bit
images otherwise than PIL does, so those stop with an error instead.

DALI cannot skip a file that fails to decode: a failed decode ends its
pipeline, and a JPEG cut short decodes without complaint wherever a training
crop stays inside the part that is there (where the "pil" engine stops or,
with data.skip_bad_files=True, skips it). So `data.skip_bad_files=True` is
refused with DALI, and every file is checked for its end-of-image marker
before DALI sees it: a file cut short stops the run with its name, at the
first batch that holds it, whatever the crop.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Any, Iterator

import numpy as np
from PIL import Image

from tlflax.data import images as image_files
from tlflax.data import pipeline
from tlflax.data import sources
from tlflax.data import transforms

ENGINES = ("pil", "dali", "dali_cpu")
# The decoder's device in DALI's terms for each engine.
_DECODER_DEVICE = {"dali": "mixed", "dali_cpu": "cpu"}
_AUGMENTATIONS = ("random_resized_crop", "none")
_EXIF_ORIENTATION = 0x0112
# Inside entropy-coded JPEG data a 0xFF byte is followed by 0x00 (a stuffed
# byte), a restart marker 0xD0-0xD7 or another 0xFF (fill): anything else
# is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_WHAT_TO_DO = ("data.engine={engine!r} cannot skip files that fail to decode: replace or "
               "remove it, or use data.engine='pil' with data.skip_bad_files=True to skip it.")


def import_dali():
  """`nvidia.dali`, or an ImportError that says how to install it."""
  try:
    import nvidia.dali  # pylint: disable=import-outside-toplevel
    from nvidia.dali import fn, types  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ImportError(
        "config.data.engine='dali' needs NVIDIA DALI: `.venv/bin/pip install "
        "nvidia-dali-cuda120` (CUDA 12; nvidia-dali-cuda130 for CUDA 13). Or set "
        "data.engine='pil'.") from e
  return nvidia.dali


@dataclasses.dataclass(frozen=True, eq=False)
class DaliDataset(pipeline.Dataset):
  """A `Dataset` whose batches DALI decodes and transforms.

  Attributes:
    engine: "dali" (GPU: the process's first visible one) or "dali_cpu".

  DALI runs `num_threads` CPU threads (the decoding itself with "dali_cpu").
  """
  engine: str = "dali"

  def _stream(self, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
    """The batches of steps `start` ... `stop - 1` (checked by `Dataset.stream`), from DALI."""
    if start == stop:
      return iter(())  # no DALI pipeline for nothing
    return self._dali_stream(start, stop)

  def _batch(self, epoch: int, step: int, workers, allocate=None) -> dict[str, np.ndarray]:
    """One batch alone (`Dataset.batch`), through its own DALI pipeline."""
    del workers, allocate
    first = epoch * self.steps_per_epoch + step
    return next(self._dali_stream(first, first + 1))

  def _dali_stream(self, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
    dali = import_dali()
    plans = (self._plan(step) for step in range(start, stop))
    graph = self._graph(dali, plans)
    graph.build()
    for step in range(start, stop):
      try:
        images, labels, real = graph.run()
      except RuntimeError as error:  # DALI's, e.g. "Failed to decode sample #3"
        # The graph runs ahead (prefetch_queue_depth): the file may be in a later batch.
        raise self._decode_failure(range(step, min(step + 3, stop)), error) from error
      if self.engine == "dali":
        images = images.as_cpu()
      images = np.array(images.as_array())
      real = np.array(real.as_array()).astype(bool)
      images[~real] = 0  # padding rows decoded a real file as a stand-in
      batch = {"image": images, "label": np.array(labels.as_array()).astype(np.int32)}
      if not self.training:
        batch["mask"] = real.astype(np.float32)
      yield batch

  def _graph(self, dali, plans: Iterator[tuple[list, ...]]):
    """The DALI pipeline: files, crop boxes and sizes in; uint8 batches out."""
    fn, types = dali.fn, dali.types
    size = self.image_size
    device = _DECODER_DEVICE[self.engine]
    graph = dali.Pipeline(batch_size=self.local_batch_size,
                          num_threads=max(1, self.num_threads),
                          device_id=0 if self.engine == "dali" else None,
                          prefetch_queue_depth=2)
    with graph:
      augmented = self.augment == "random_resized_crop"
      encoded, first, second, labels, real, *flip = fn.external_source(
          source=plans, num_outputs=6 if augmented else 5, batch=True)
      if augmented:
        # first = the box's (left, top), second = its (width, height).
        images = fn.decoders.image_slice(encoded, start=first, shape=second, axis_names="WH",
                                         device=device, output_type=types.RGB)
        images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR,
                           antialias=True)
        images = fn.flip(images, horizontal=flip[0])
      else:
        # first = the resized (height, width), second = the crop's (left, top).
        images = fn.decoders.image(encoded, device=device, output_type=types.RGB)
        images = fn.resize(images, size=first, interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.slice(images, start=second, shape=[size, size], axis_names="WH")
      graph.set_outputs(images, labels, real)
    return graph

  def _plan(self, step: int) -> tuple[list, ...]:
    """One batch for DALI, row by row: the file, the box (training) or the
    resize and crop (evaluation), the label, real (1) or padding (0), and for
    training the flip."""
    epoch, batch = divmod(step, self.steps_per_epoch)
    positions = self._positions(epoch, batch)
    real = positions >= 0
    ids = self.example_ids[positions[real]]
    if not len(ids):  # this process's rows of the last batch are all padding
      ids = self.example_ids[:1]
    raws, labels = self.source.read(ids)
    encoded = [encoded_jpeg(self.source, raw) for raw in raws]
    for data, example_id in zip(encoded, ids):
      if jpeg_cut_short(data):
        raise image_files.ImageError(
            f"{self.source.example_name(int(example_id))} is cut short: its JPEG data ends "
            f"before the end-of-image marker. " + _WHAT_TO_DO.format(engine=self.engine))
    shapes = [jpeg_height_width(data, image_files.image_name(_item(self.source, raw)))
              for data, raw in zip(encoded, raws)]
    augmented = self.augment == "random_resized_crop"
    if augmented:
      uniforms = transforms.stateless_uniform((self.seed, epoch), ids,
                                              transforms.num_draws(self.augment))
    columns = []  # per real example: (first, second[, flip])
    for index, (height, width) in enumerate(shapes):
      if augmented:
        row = uniforms[index]
        top, left, box_height, box_width = transforms.random_resized_box(height, width, row)
        columns.append((np.array([left, top], np.int32),
                        np.array([box_width, box_height], np.int32),
                        np.array(transforms.random_resized_flip(row), np.int32)))
      else:
        new_height, new_width, top, left = image_files.resize_and_crop_geometry(
            height, width, self.preprocessing.resize_size, self.image_size)
        columns.append((np.array([new_height, new_width], np.float32),
                        np.array([left, top], np.int32)))
    # Padding rows decode the first example as a stand-in; `_stream` blanks them.
    source_row = np.where(real, np.cumsum(real) - 1, 0)
    all_labels = np.zeros(len(positions), np.int32)
    all_labels[real] = labels[:int(real.sum())]
    plan = ([encoded[i] for i in source_row],
            *([columns[i][k] for i in source_row] for k in range(2)),
            [np.array(label, np.int32) for label in all_labels],
            [np.array(flag, np.uint8) for flag in real])
    return plan + (([columns[i][2] for i in source_row],) if augmented else ())

  def _decode_failure(self, steps: range, error: RuntimeError) -> Exception:
    """The error to raise for a batch DALI failed to decode: naming the file where PIL
    cannot decode it either, else DALI's own error."""
    for step in steps:
      epoch, batch = divmod(step, self.steps_per_epoch)
      positions = self._positions(epoch, batch)
      ids = self.example_ids[positions[positions >= 0]]
      raws, _ = self.source.read(ids)
      for example_id, raw in zip(ids, raws):
        try:
          self.source.image(raw)
        except image_files.ImageError as bad:
          name = self.source.example_name(int(example_id))
          message = str(bad).rstrip(".")
          return image_files.ImageError(
              f"{message if name in message else f'{message} ({name})'}. "
              + _WHAT_TO_DO.format(engine=self.engine))
    return error


def jpeg_cut_short(data: bytes | np.ndarray) -> bool:
  """Whether a JPEG file's data ends before its end-of-image marker (a file cut short).

  Follows the marker segments from the start and jumps over entropy-coded
  data, so an end-of-image marker of an embedded thumbnail, or data appended
  after the image (a second picture, a video), changes nothing. A file whose
  structure cannot be followed counts as whole: the decoder judges it.
  """
  data = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
  if data[:2] != b"\xff\xd8":
    return False
  position = 2
  while True:
    if position + 2 > len(data):
      return True
    if data[position] != 0xFF:
      return False  # not a marker where one belongs: leave it to the decoder
    marker = data[position + 1]
    if marker == 0xD9:  # end of image
      return False
    if marker == 0xFF:  # fill byte before a marker
      position += 1
      continue
    if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
      position += 2
      continue
    if position + 4 > len(data):
      return True
    position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
      following = _NEXT_MARKER.search(data, min(position, len(data)))
      if following is None:
        return True
      position = following.start()


def encoded_jpeg(source: sources.ExampleSource, raw: Any) -> np.ndarray:
  """A raw item of `source` (a path or encoded bytes) as the file's bytes, uint8 (N,)."""
  item = _item(source, raw)
  if isinstance(item, (bytes, bytearray, memoryview)):
    return np.frombuffer(bytes(item), np.uint8)
  if isinstance(item, (str, os.PathLike)):
    return np.fromfile(item, np.uint8)
  raise ValueError(f"data.engine='dali' decodes image files, but this dataset holds decoded "
                   f"arrays ({type(item).__name__}); use data.engine='pil'.")


def jpeg_height_width(image_file: Any, name: str) -> tuple[int, int]:
  """(height, width) of a JPEG after its EXIF orientation, read from its header only.

  Args:
    image_file: a path, or the file's bytes as uint8 (N,).
    name: how an error names the image.

  Raises:
    image_files.ImageError: not a JPEG, or a JPEG that DALI would not decode
      as PIL does (not RGB or greyscale).
  """
  if isinstance(image_file, np.ndarray):
    image_file = io.BytesIO(image_file.tobytes())
  try:
    with Image.open(image_file) as image:
      kind, mode, (width, height) = image.format, image.mode, image.size
      orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
  except (OSError, ValueError, SyntaxError) as e:
    raise image_files.ImageError(f"Cannot read {name} as an image: {e}") from e
  if kind != "JPEG" or mode not in ("RGB", "L"):
    raise image_files.ImageError(
        f"{name} is a {kind} image in mode {mode}; data.engine='dali' takes RGB or greyscale "
        f"JPEGs only (it would not treat others as PIL does). Convert it, or use "
        f"data.engine='pil'.")
  # Orientations 5-8 turn the image by 90 degrees.
  return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _item(source: sources.ExampleSource, raw: Any) -> Any:
  """The path or bytes inside a raw item (ConcatSource wraps them with their part)."""
  return _item(source.parts[raw[0]], raw[1]) if isinstance(source, sources.ConcatSource) else raw


def check_dataset(dataset: pipeline.Dataset, engine: str) -> None:
  """Fails early, with what to do, where DALI cannot make this dataset's batches."""
  if engine not in ENGINES:
    raise ValueError(f"Unknown data.engine {engine!r}; use one of {ENGINES}.")
  if dataset.augment not in _AUGMENTATIONS:
    raise ValueError(f"data.engine={engine!r} supports data.augment in {_AUGMENTATIONS}, "
                     f"not {dataset.augment!r}; use data.engine='pil' for it.")
  if dataset.skip_bad_files:
    raise ValueError(
        f"data.engine={engine!r} cannot skip files that fail to decode "
        "(data.skip_bad_files=True): a failed decode ends DALI's pipeline. Use "
        "data.engine='pil' to skip them, or set data.skip_bad_files=False: DALI then stops at "
        "a bad file and names it.")
  dali = import_dali()
  if engine == "dali" and dali.backend.GetCUDADeviceCount() == 0:
    raise ValueError("data.engine='dali' decodes on an NVIDIA GPU, and DALI sees none on this "
                     "host. Use data.engine='dali_cpu' (the same DALI graph on the CPU) or 'pil'.")
  ids = dataset.example_ids
  raws, _ = dataset.source.read(ids[:1])
  if isinstance(_item(dataset.source, raws[0]), (str, os.PathLike)):
    # Image files: every header (as the folder source reads them all), so
    # that a file DALI cannot take stops the run now, not hours into it.
    raws, _ = dataset.source.read(ids)
    for raw in raws:
      item = _item(dataset.source, raw)
      jpeg_height_width(item, image_files.image_name(item))
  else:
    jpeg_height_width(encoded_jpeg(dataset.source, raws[0]), "the first image")
