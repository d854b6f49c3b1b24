"""Where examples come from: a split of a TFDS dataset or of an image folder.

Every source is an `ExampleSource`: random access to example `i` of one
split (its raw image and label), the labels of all examples, and the class
names. Reading is split in two steps, `read` (cheap, in order) and `decode`
(the costly part, safe to run on several threads), so the pipeline can decode
a batch in parallel.

TFDS datasets are read offline from a prepared `data_dir`, never downloaded:

* prepared as ArrayRecord (`tfds build NAME --file_format=array_record`):
  random access through `builder.as_data_source`, so any size works; images
  are decoded when read. Labels are only read in full (one pass over the
  records) when a few-shot subset asks for them.
* prepared as TFRecord (the TFDS default), up to
  `TFRECORD_IN_MEMORY_LIMIT_BYTES` (2 GiB) of what it would hold in memory:
  the split is read once into memory, as decoded uint8 arrays when the
  dataset declares a fixed image shape (CIFAR, MNIST, ...) and as the encoded
  image files otherwise.
* prepared as TFRecord and larger than that (ImageNet, Food-101, ...): read
  by random access through an index of where each record starts in its file
  (`tlflax.data.tfrecord_index`, built once and cached), so nothing is
  converted or held in memory; images are decoded when read. The files must
  be on a local disk; on a remote one (gs://...) prepare the dataset as
  ArrayRecord instead, and the error says how.

Image folders (`root/<split>/<class>/<image>`) are listed once and read file
by file.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
from typing import Any, Sequence

import numpy as np

from tlflax.data import images as image_files
from tlflax.data import tensorflow_setup
from tlflax.data import tfrecord_index

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm")
# Orders a folder's files before slicing, so "train[:80%]" is a random 80%
# and not the first classes; fixed, so the split never changes between runs.
_FOLDER_SLICE_SEED = 20240229
# A TFRecord split that would hold more than this in memory (decoded pixels
# for a fixed image shape, else its encoded files) is read by random access
# from its files instead. 2 GiB keeps the small benchmarks (CIFAR-10/100:
# 150 MB decoded, SVHN, MNIST, the Oxford and Caltech sets) in memory, where
# each process reads them once, and every ImageNet-sized split on disk.
TFRECORD_IN_MEMORY_LIMIT_BYTES = 2 * 1024**3


class ExampleSource:
  """Random access to the examples of one split."""

  class_names: tuple[str, ...]
  # True when `decode` does real work (files to decode) worth a thread pool.
  decodes: bool = False

  def __len__(self) -> int:
    raise NotImplementedError

  def labels(self) -> np.ndarray:
    """int64 (N,): the label of every example."""
    raise NotImplementedError

  def read(self, indices: Sequence[int]) -> tuple[list[Any], np.ndarray]:
    """The raw images (arrays, encoded bytes or paths) and int64 labels of these examples."""
    raise NotImplementedError

  def decode(self, raw: Any) -> np.ndarray:
    """A raw image from `read` -> uint8 (H, W, C)."""
    return np.asarray(self.image(raw))

  def image(self, raw: Any) -> Any:
    """A raw image from `read`, ready for a transform: a uint8 (H, W, C) array,
    or for files a decoded RGB PIL image, not yet copied into an array."""
    return raw

  def image_shape(self) -> tuple[int, int] | None:
    """(height, width) shared by every image, or None when unknown or mixed."""
    return None

  def example_name(self, index: int) -> str:
    """How a message names example `index`: its file's path where it has one."""
    return f"example {index} of the split"


@dataclasses.dataclass
class ArraySource(ExampleSource):
  """Decoded images held in memory: uint8 (N, H, W, C)."""
  pixels: np.ndarray
  all_labels: np.ndarray
  class_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.all_labels)

  def labels(self) -> np.ndarray:
    return self.all_labels

  def read(self, indices):
    indices = np.asarray(indices, np.int64)
    return list(self.pixels[indices]), self.all_labels[indices]

  def image_shape(self):
    return tuple(self.pixels.shape[1:3])


@dataclasses.dataclass
class EncodedSource(ExampleSource):
  """Image files (paths) or their encoded bytes, decoded when read."""
  items: Sequence[Any]
  all_labels: np.ndarray
  class_names: tuple[str, ...]
  decodes: bool = True

  def __len__(self) -> int:
    return len(self.all_labels)

  def labels(self) -> np.ndarray:
    return self.all_labels

  def read(self, indices):
    return [self.items[i] for i in indices], self.all_labels[np.asarray(indices, np.int64)]

  def image(self, raw):
    return _open_image(raw)

  def example_name(self, index):
    item = self.items[index]
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else super().example_name(index)


@dataclasses.dataclass
class TfdsRandomAccessSource(ExampleSource):
  """A TFDS ArrayRecord data source; images stay encoded until decoded."""
  data_source: Any
  image_key: str
  label_key: str
  class_names: tuple[str, ...]
  decodes: bool = True
  _labels: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.data_source)

  def labels(self) -> np.ndarray:
    if self._labels is None:
      # One pass over every record; only few-shot subsets need this.
      chunk = 4096
      labels = []
      for start in range(0, len(self), chunk):
        records = self.data_source.__getitems__(list(range(start, min(start + chunk, len(self)))))
        labels.extend(int(r[self.label_key]) for r in records)
      self._labels = np.asarray(labels, np.int64)
    return self._labels

  def read(self, indices):
    records = self.data_source.__getitems__([int(i) for i in indices])
    return ([r[self.image_key] for r in records],
            np.asarray([int(r[self.label_key]) for r in records], np.int64))

  def image(self, raw):
    return _open_image(raw)


@dataclasses.dataclass
class TfRecordIndexSource(ExampleSource):
  """A TFRecord split read record by record from its files, through an index.

  The records are parsed with the dataset's own features, images left
  encoded until decoded.
  """
  records: tfrecord_index.IndexedRecords
  features: Any  # the dataset's tfds FeaturesDict
  image_key: str
  label_key: str
  class_names: tuple[str, ...]
  decodes: bool = True
  _labels: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.records)

  def _parse(self, index: int) -> dict[str, Any]:
    tfds = tensorflow_setup.import_tfds()
    return self.features.deserialize_example_np(
        self.records[index], decoders={self.image_key: tfds.decode.SkipDecoding()})

  def labels(self) -> np.ndarray:
    if self._labels is None:
      # One pass over every record; only few-shot subsets need this.
      self._labels = np.asarray([int(self._parse(i)[self.label_key]) for i in range(len(self))],
                                np.int64)
    return self._labels

  def read(self, indices):
    examples = [self._parse(int(i)) for i in indices]
    return ([e[self.image_key] for e in examples],
            np.asarray([int(e[self.label_key]) for e in examples], np.int64))

  def image(self, raw):
    return _open_image(raw)


@dataclasses.dataclass
class ConcatSource(ExampleSource):
  """Several sources with the same classes, one after another.

  Example `i` of the second part is example `len(first) + i` here. Raw items
  remember their part, so each is decoded by the source it came from.
  """
  parts: Sequence[ExampleSource]

  def __post_init__(self):
    names = {tuple(part.class_names) for part in self.parts}
    if len(names) != 1:
      raise ValueError(f"Cannot join sources with different classes: {sorted(names)}.")
    self.class_names = tuple(self.parts[0].class_names)
    self.decodes = any(part.decodes for part in self.parts)
    self._starts = np.cumsum([0] + [len(part) for part in self.parts])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def labels(self) -> np.ndarray:
    return np.concatenate([part.labels() for part in self.parts])

  def read(self, indices):
    indices = np.asarray(indices, np.int64)
    which = np.searchsorted(self._starts, indices, side="right") - 1
    raws, labels = [None] * len(indices), np.zeros(len(indices), np.int64)
    for part_index, part in enumerate(self.parts):
      rows = np.flatnonzero(which == part_index)
      if len(rows):
        part_raws, labels[rows] = part.read(indices[rows] - self._starts[part_index])
        for row, raw in zip(rows, part_raws):
          raws[row] = (part_index, raw)
    return raws, labels

  def image(self, raw):
    part_index, item = raw
    return self.parts[part_index].image(item)

  def image_shape(self):
    shapes = {part.image_shape() for part in self.parts}
    return shapes.pop() if len(shapes) == 1 else None

  def example_name(self, index):
    part_index = int(np.searchsorted(self._starts, index, side="right") - 1)
    return self.parts[part_index].example_name(int(index - self._starts[part_index]))


def _open_image(raw: Any):
  """A path or encoded image bytes -> a decoded RGB PIL image."""
  if isinstance(raw, (bytes, bytearray, memoryview)):
    return image_files.open_rgb(io.BytesIO(bytes(raw)))
  return image_files.open_rgb(raw)


# ---------------------------------------------------------------- TFDS


def tfds_source(name: str, data_dir: str, split: str,
                in_memory_limit_bytes: int | None = None) -> ExampleSource:
  """One split of a prepared TFDS dataset, read without any network access.

  Args:
    name: TFDS name, optionally with config and version ("cifar10",
      "tlflax_digits/source:1.0.0").
    data_dir: the folder it was prepared in; "" = the TFDS default.
    split: a TFDS split string ("train", "train[:80%]", "test").
    in_memory_limit_bytes: a TFRecord split that would hold more than this in
      memory is read by random access from its files instead; None =
      `TFRECORD_IN_MEMORY_LIMIT_BYTES`. ArrayRecord splits are always read by
      random access.

  Returns:
    An `ExampleSource`: `TfdsRandomAccessSource` (ArrayRecord),
    `TfRecordIndexSource` (large TFRecord), else `ArraySource` or
    `EncodedSource` held in memory.

  Raises:
    FileNotFoundError: the dataset is not prepared in `data_dir`. Raised at
      once: nothing is downloaded.
    ValueError: a large TFRecord split on a remote file system, or one whose
      files do not hold the records its metadata counts; the message says
      what to run.

  Examples:
    >>> source = tfds_source("imagenet2012", "/data/tfds", "train")
    >>> raw_images, labels = source.read([5, 17])
  """
  tfds = tensorflow_setup.import_tfds()
  builder = prepared_builder(name, data_dir)
  image_key, label_key = _feature_keys(builder.info)
  class_names = tuple(builder.info.features[label_key].names)
  random_access = tfds.core.file_adapters.FileFormat.with_random_access()
  if builder.info.available_file_formats() & set(random_access):
    data_source = builder.as_data_source(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    return TfdsRandomAccessSource(data_source, image_key, label_key, class_names)

  limit = (TFRECORD_IN_MEMORY_LIMIT_BYTES if in_memory_limit_bytes is None
           else in_memory_limit_bytes)
  instructions = builder.info.splits[split].file_instructions
  in_memory = _tfrecord_bytes_in_memory(builder.info, image_key, instructions)
  if in_memory > limit:
    logging.getLogger(__name__).info(
        "%s split %r would hold %.2f GiB in memory (limit %.2f GiB): reading it by random "
        "access from its TFRecord files, indexed in %s.", name, split, in_memory / 1024**3,
        limit / 1024**3, tfrecord_index.index_dir())
    shown_dir = data_dir or os.path.expanduser(tfds.core.constants.DATA_DIR)
    records = tfrecord_index.IndexedRecords.from_shards(
        [(os.fspath(i.filename), i.skip, _examples_taken(i), i.examples_in_shard)
         for i in instructions], f"tfds build {name} --data_dir={shown_dir}")
    return TfRecordIndexSource(records, builder.info.features, image_key, label_key,
                               class_names)

  image_shape = builder.info.features[image_key].shape
  # shuffle_files=False: TFDS then reads in a fixed order, which exact resume needs.
  if all(isinstance(d, int) for d in image_shape):
    everything = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                  shuffle_files=False))
    return ArraySource(everything[image_key], everything[label_key].astype(np.int64),
                       class_names)
  dataset = builder.as_dataset(split=split, shuffle_files=False,
                               decoders={image_key: tfds.decode.SkipDecoding()})
  items, labels = [], []
  for example in tfds.as_numpy(dataset):
    items.append(example[image_key])
    labels.append(int(example[label_key]))
  return EncodedSource(items, np.asarray(labels, np.int64), class_names)


def _tfrecord_bytes_in_memory(info, image_key: str, instructions) -> int:
  """What reading these shards whole would hold: decoded pixels, else the encoded files."""
  shape = info.features[image_key].shape
  if all(isinstance(d, int) for d in shape):
    return sum(_examples_taken(i) for i in instructions) * int(np.prod(shape))
  # Encoded images are most of a record: the files' share of the split is the bound.
  tensorflow = tensorflow_setup.import_tensorflow()
  return int(sum(tensorflow.io.gfile.stat(os.fspath(i.filename)).length
                 * _examples_taken(i) / max(1, i.examples_in_shard) for i in instructions))


def _examples_taken(instruction) -> int:
  """How many records a TFDS file instruction reads (its `take` of -1 means to the end)."""
  if instruction.take < 0:
    return instruction.examples_in_shard - instruction.skip
  return instruction.take


def prepared_builder(name: str, data_dir: str):
  """`tfds.builder(name, data_dir)`, failing at once when it is not prepared there.

  Args:
    name: TFDS name.
    data_dir: "" = the TFDS default.

  Returns:
    A prepared `tfds.core.DatasetBuilder`.
  """
  tfds = tensorflow_setup.import_tfds()
  shown_dir = data_dir or os.path.expanduser(tfds.core.constants.DATA_DIR)
  how_to = (
      "tlflax reads TFDS datasets offline and never downloads them. Prepare it once "
      "where there is internet access:\n"
      f"    tfds build {name} --data_dir={shown_dir}\n"
      "(add --file_format=array_record for random access to large datasets), or copy "
      "a prepared copy into that folder. For the offline demo data use "
      "config.data.source='digits'.")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise FileNotFoundError(
        f"TFDS knows no dataset {name!r} and none is prepared in data_dir {shown_dir!r}. "
        f"{how_to}") from error
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir {shown_dir!r} (looked for "
        f"{builder.data_dir}). {how_to}")
  return builder


def _feature_keys(info) -> tuple[str, str]:
  """The (image, label) feature names: the supervised keys, else the first of each kind."""
  tfds = tensorflow_setup.import_tfds()
  keys = info.supervised_keys
  if (isinstance(keys, (tuple, list)) and len(keys) == 2
      and all(isinstance(k, str) for k in keys)):
    image_key, label_key = keys
  else:
    image_key = next((k for k, f in info.features.items()
                      if isinstance(f, tfds.features.Image)), None)
    label_key = next((k for k, f in info.features.items()
                      if isinstance(f, tfds.features.ClassLabel)), None)
  if (image_key is None or label_key is None
      or not isinstance(info.features[image_key], tfds.features.Image)
      or not isinstance(info.features[label_key], tfds.features.ClassLabel)):
    raise ValueError(f"{info.full_name} has no image feature with a class label "
                     f"(features: {list(info.features)}).")
  return image_key, label_key


# ---------------------------------------------------------------- image folders


def folder_source(root: str, split: str, class_split: str = "",
                  skip_bad_files: bool = False) -> EncodedSource:
  """One split of an image folder `root/<split>/<class>/<image file>`.

  Args:
    root: the folder holding one sub-folder per split ("train", "val", ...).
      Use split "." when `root` holds the class folders directly.
    split: the split's sub-folder, optionally sliced like TFDS: "train",
      "val", ".[:80%]", ".[80%:]", "train[:100]". A slice takes a fixed
      random share of the files (the same in every run).
    class_split: the split whose sub-folders define the classes (normally
      the training split), so every split numbers classes alike; "" = `split`.
    skip_bad_files: leave out files whose header is not an image's (with a
      warning that counts and names them) instead of refusing the folder.
      (A file whose header reads but whose data does not, e.g. cut short, is
      found when it is decoded; the pipeline skips it then, see
      `pipeline.Dataset`.)

  Returns:
    An `EncodedSource` of the image files; class names are the sorted
    sub-folder names.

  Raises:
    FileNotFoundError: a missing root or split folder, or no images.
    ValueError: a class folder without images, a split whose classes differ
      from `class_split`'s, or files that are no images (each named).
  """
  folder_name, start, end = parse_split(split)
  class_names = _class_folders(root, parse_split(class_split or split)[0])
  split_dir = os.path.join(root, folder_name)
  own_classes = _class_folders(root, folder_name)
  if own_classes != class_names:
    # A head trained on other classes than it is tested on would say nothing.
    extra = sorted(set(own_classes) - set(class_names))
    missing = sorted(set(class_names) - set(own_classes))
    raise ValueError(
        f"The class folders of {split_dir} differ from those of "
        f"{os.path.join(root, parse_split(class_split or split)[0])}: "
        + "; ".join(part for part in (f"only in {split_dir}: {', '.join(extra)}" if extra else "",
                                      f"missing from {split_dir}: {', '.join(missing)}"
                                      if missing else "") if part)
        + ". Every split needs the same class sub-folders.")
  paths, labels, empty = [], [], []
  for label, class_name in enumerate(class_names):
    class_dir = os.path.join(split_dir, class_name)
    found = [name for name in sorted(os.listdir(class_dir))
             if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
      empty.append(class_dir)
    paths += [os.path.join(class_dir, name) for name in found]
    labels += [label] * len(found)
  if not paths:
    raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}.")
  if empty:
    raise ValueError(f"{len(empty)} class folder{'s hold' if len(empty) > 1 else ' holds'} "
                     "no image files "
                     f"({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}. Add images or "
                     "remove the folder (from every split).")
  paths, labels = _check_images(paths, labels, skip_bad_files)
  order = np.arange(len(paths))
  if (start, end) != (None, None):
    order = np.random.default_rng(_FOLDER_SLICE_SEED).permutation(len(paths))
    order = np.sort(order[_slice_bound(start, len(paths), 0):_slice_bound(end, len(paths),
                                                                          len(paths))])
  return EncodedSource([paths[i] for i in order], np.asarray(labels, np.int64)[order],
                       tuple(class_names))


def _check_images(paths: list[str], labels: list[int], skip_bad_files: bool
                  ) -> tuple[list[str], list[int]]:
  """Opens every file's header before training, so a bad file is named at once."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  with concurrent.futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
    problems = list(pool.map(image_files.check_header, paths))
  bad = [(path, why) for path, why in zip(paths, problems) if why]
  if not bad:
    return paths, labels
  listed = "; ".join(f"{path}: {why}" for path, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
  if not skip_bad_files:
    raise ValueError(f"{len(bad)} of {len(paths)} files are not readable images: {listed}. "
                     "Remove or replace them, or set config.data.skip_bad_files=True to "
                     "train without them.")
  logging.getLogger(__name__).warning("Skipping %d of %d files that are not readable images: %s",
                                      len(bad), len(paths), listed)
  keep = [i for i, why in enumerate(problems) if not why]
  return [paths[i] for i in keep], [labels[i] for i in keep]


def _class_folders(root: str, folder_name: str) -> list[str]:
  split_dir = os.path.join(root, folder_name)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"The image folder {os.path.normpath(root)} does not exist: set "
                            "--config.data.path "
                            "to a folder with one sub-folder per split (or per class).")
  if not os.path.isdir(split_dir):
    available = (sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
                 if os.path.isdir(root) else "none: the root does not exist")
    raise FileNotFoundError(
        f"Image folder split {split_dir} does not exist (sub-folders of {root}: {available}). "
        "Set config.data.train_split/eval_split to sub-folder names, or '.[:80%]' and "
        "'.[80%:]' when the root holds the class folders directly.")
  classes = sorted(d for d in os.listdir(split_dir)
                   if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d)))
  if not classes:
    raise FileNotFoundError(f"{split_dir} has no class sub-folders.")
  return classes


_SPLIT_PATTERN = re.compile(r"^(?P<name>[^\[\]]+)(\[(?P<start>-?\d+%?)?:(?P<end>-?\d+%?)?\])?$")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
  """"train[10%:50%]" -> ("train", "10%", "50%"); "val" -> ("val", None, None)."""
  match = _SPLIT_PATTERN.match(split.strip())
  if not match:
    raise ValueError(f"Cannot read split {split!r}; expected NAME or NAME[start:end] "
                     "with counts or percentages.")
  return match["name"], match["start"], match["end"]


def _slice_bound(bound: str | None, length: int, default: int) -> int:
  if bound is None:
    return default
  if bound.endswith("%"):
    value = int(round(length * int(bound[:-1]) / 100.0))
  else:
    value = int(bound)
  if value < 0:
    value += length
  return max(0, min(length, value))
