"""`config.data` -> a dataset: the source of a split, and the engine that batches it.

    >>> train = build(config.data, split="train", training=True, global_batch_size=128,
    ...               seed=0, process_index=jax.process_index(),
    ...               process_count=jax.process_count())

The examples come from a `sources.ExampleSource` (TFDS, an image folder, the
embedded digits); `pipeline.Dataset` batches them with PIL, and
`dali_engine.DaliDataset` with NVIDIA DALI (`config.data.engine`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from tlflax.data import dali_engine, images, pipeline, sources, transforms

SOURCES = ("tfds", "folder", "digits")


def load_source(data_config, split: str) -> sources.ExampleSource:
  """The examples of one split named in `config.data`.

  Args:
    data_config: `config.data` (see tlflax/defaults.py).
    split: "train" (config.data.train_split) or "eval" (config.data.eval_split).

  Returns:
    An `ExampleSource`.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}.")
  split_name = data_config.train_split if split == "train" else data_config.eval_split
  kind = data_config.source
  if kind == "tfds":
    if not data_config.name:
      raise ValueError("config.data.name must name the TFDS dataset (e.g. 'cifar10').")
    return sources.tfds_source(data_config.name, data_config.data_dir, split_name)
  if kind == "digits":
    # Imported here: it registers a TFDS builder and needs scikit-learn.
    from tlflax.data import digits  # pylint: disable=import-outside-toplevel
    data_dir = digits.prepare(data_config.name, data_config.data_dir)
    return sources.tfds_source(f"{digits.DATASET_NAME}/{data_config.name}", data_dir, split_name)
  if kind == "folder":
    if not data_config.path:
      raise ValueError("config.data.path must be the image folder for source='folder'.")
    return sources.folder_source(data_config.path, split_name,
                                 class_split=data_config.train_split,
                                 skip_bad_files=data_config.get("skip_bad_files", False))
  raise ValueError(f"Unknown config.data.source {kind!r}; use one of {SOURCES}.")


def build(data_config, split: str, training: bool, global_batch_size: int, seed: int = 0,
          process_index: int = 0, process_count: int = 1, num_threads: int = 0,
          num_workers: int | None = None) -> pipeline.Dataset:
  """Reads a split named in `config.data` and batches it for this process.

  Args:
    data_config: `config.data` (source, name, data_dir, path, splits, sizes,
      mean/std, augment, train_examples_per_class, skip_bad_files, engine:
      "pil", or "dali" / "dali_cpu" for NVIDIA DALI, see `dali_engine`).
    split: "train" or "eval".
    training: shuffle, augment and drop the remainder (True), or keep the
      order, apply the eval transform and pad the last batch (False).
    global_batch_size: examples per step over all processes.
    seed: decides the order, the augmentation and the few-shot subset.
    process_index: this process, 0 <= process_index < process_count.
    process_count: how many processes share the batches.
    num_threads: threads that decode and transform images in this process;
      0 = one per CPU core where images need decoding or resizing, else 1.
    num_workers: worker processes that prepare batches (Grain), for streams
      of at least `MIN_IMAGES_FOR_PROCESSES` images; 0 = none (threads);
      -1 = one per CPU core where images are files to decode, else none;
      None = `data_config.num_workers` (default -1).

  Returns:
    A `pipeline.Dataset` (a `dali_engine.DaliDataset` for the DALI engines).
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Bad process_index {process_index} of process_count {process_count}.")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"the process count {process_count}.")
  augment = data_config.augment if training else "none"
  transforms.num_draws(augment)  # fails early on an unknown name
  image_size = int(data_config.image_size)
  preprocessing = images.Preprocessing(
      crop_size=image_size, resize_size=int(data_config.resize_size) or image_size,
      # Unset (()): ImageNet's, the Preprocessing default (training and
      # features fill them from the weights first: build.with_data_normalization).
      **({"mean": tuple(data_config.mean)} if len(data_config.mean) else {}),
      **({"std": tuple(data_config.std)} if len(data_config.std) else {}))

  source = load_source(data_config, split)
  class_names = tuple(source.class_names)
  example_ids = np.arange(len(source), dtype=np.int64)
  per_class = int(data_config.train_examples_per_class)
  if split == "train" and per_class > 0:
    example_ids = pipeline.few_shot_subset(source.labels(), per_class, len(class_names), seed)
  elif split == "eval" and per_class > 0 and data_config.get("eval_on_unused_train", False):
    # Every image the run did not train on: the eval split, then the train
    # split's examples that this seed's few-shot subset left out.
    train_source = load_source(data_config, "train")
    used = pipeline.few_shot_subset(train_source.labels(), per_class, len(class_names), seed)
    unused = np.setdiff1d(np.arange(len(train_source), dtype=np.int64), used)
    example_ids = np.concatenate([example_ids, len(source) + unused])
    source = sources.ConcatSource([source, train_source])
  num_examples = len(example_ids)
  if training:
    steps = num_examples // global_batch_size
    if steps == 0:
      raise ValueError(f"The {split} split has {num_examples} examples, fewer than one "
                       f"global batch of {global_batch_size}.")
  else:
    steps = -(-num_examples // global_batch_size)
  if num_threads <= 0:
    # Threads pay off only where PIL decodes or resizes (it releases the GIL);
    # small in-memory arrays of the right size are quicker in a plain loop.
    needs_pil = (source.decodes or augment == "random_resized_crop"
                 or preprocessing.resize_size != image_size
                 or source.image_shape() != (image_size, image_size))
    num_threads = max(1, os.cpu_count() or 1) if needs_pil else 1
  if num_workers is None:
    num_workers = int(data_config.get("num_workers", -1))
  if num_workers < 0:
    # Processes pay off where the GIL holds threads back: decoding files.
    num_workers = max(1, os.cpu_count() or 1) if source.decodes else 0
  dataset = pipeline.Dataset(
      num_examples=num_examples, num_classes=len(class_names), class_names=class_names,
      steps_per_epoch=steps, global_batch_size=global_batch_size,
      local_batch_size=global_batch_size // process_count, training=training,
      image_size=image_size, augment=augment, seed=int(seed), process_index=process_index,
      process_count=process_count, source=source, example_ids=example_ids,
      preprocessing=preprocessing, num_threads=num_threads, num_workers=num_workers,
      skip_bad_files=bool(data_config.get("skip_bad_files", False)))
  engine = data_config.get("engine", "pil")
  if engine == "pil":
    return dataset
  dali_engine.check_dataset(dataset, engine)
  fields = {f.name: getattr(dataset, f.name) for f in dataclasses.fields(pipeline.Dataset)}
  return dali_engine.DaliDataset(**fields, engine=engine)
