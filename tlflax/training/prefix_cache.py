"""Frozen-prefix caching: compute a frozen prefix's output once, train the rest from it.

When the stem and the first k stages are frozen (their BatchNorm in inference
mode, as tlflax freezes them) and the input preprocessing is deterministic
(`augment="none"`), every epoch feeds each example through the same function
up to stage k. This module computes those stage-k outputs once per split,
stores them on disk, and hands the training loop a dataset that yields them
in exactly the batches, order and padding the image dataset would, together
with a model that starts after stage k (`input_stage`). The result matches
the uncached run up to float rounding.

A cache is keyed by the model and its dtype, the stage, every variable of the
prefix (its bytes), the data and preprocessing settings and the examples, so a
stale cache is never read: any change gives a new key. Caches of shallower
stages are reused: stage k is computed from the deepest cached stage j < k of
the same weights, so a freezing-depth sweep runs each stage over the data
once in all.

An entry holds a row for every example. A file that fails to decode (with
`data.skip_bad_files=True`) is refused with an error naming it
(`SkippedFileError`) before anything is written; training without the cache
skips it.

    CACHE_DIR/<key>/features.npy   float32 (examples, H, W, C) in dataset order
    CACHE_DIR/<key>/labels.npy     int32 (examples,)
    CACHE_DIR/<key>/info.json      what the key was made of
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tlflax import models
from tlflax.data import pipeline
from tlflax.freeze import Freezing
from tlflax import files
from tlflax.tree import flatten

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class SkippedFileError(ValueError):
  """A file of the data fails to decode, and the prefix cache cannot leave it out."""


def default_directory() -> str:
  """`$TLFLAX_CACHE_DIR/prefix` (default `~/.cache/tlflax/prefix`)."""
  return files.cache_dir("prefix")


def frozen_prefix(model, freezing: Freezing, params) -> Optional[str]:
  """The deepest stage such that it and every stage before it are frozen.

  Args:
    model: the backbone with its `stage_names`.
    freezing: the compiled freeze rules.
    params: the parameter tree (to see which stages own parameters).

  Returns:
    A stage name, or None when not even the first stage is wholly frozen,
    or BatchNorm statistics of frozen layers would adapt
    (`batchnorm_mode="none"`).
  """
  if freezing.batchnorm_mode == "none":
    return None
  flat = flatten(params)
  deepest = None
  for stage in model.stage_names:
    if stage == "fc" and getattr(model, "dropout_rate", 0.0):
      break  # dropout makes the training-mode output random: nothing to cache
    paths = [p for p in flat if p.startswith(stage + "/")]
    if not all(freezing.path_multiplier[p] == 0 for p in paths):
      break
    deepest = stage
    if stage == model.last_stage:
      break
  return deepest


def cache_key(model_name: str, model, stage: str, variables, data_config, split: str,
              example_ids: np.ndarray, model_options: str = "") -> str:
  """A hash of everything the cached stage output depends on."""
  digest = hashlib.sha256()
  names = list(model.stage_names)
  prefix = tuple(names[:names.index(stage) + 1])
  data = {k: data_config[k] for k in ("source", "name", "data_dir", "path", "image_size",
                                      "resize_size")}
  data["mean"], data["std"] = list(data_config.mean), list(data_config.std)
  data["split"] = data_config.train_split if split == "train" else data_config.eval_split
  data["eval_on_unused_train"] = bool(data_config.get("eval_on_unused_train", False))
  engine = data_config.get("engine", "pil")
  if engine != "pil":  # DALI's pixels differ from PIL's (keys of "pil" runs stay as they were)
    data["engine"] = engine
  description = {"version": FORMAT_VERSION, "model": model_name, "stage": stage,
                 "dtype": str(jnp.dtype(model.dtype)), "data": data,
                 "examples": len(example_ids)}
  if model_options:  # e.g. transform_input=False changes the stem (keys without stay as they were)
    description["model_options"] = model_options
  digest.update(json.dumps(description, sort_keys=True).encode())
  digest.update(np.ascontiguousarray(example_ids, np.int64).tobytes())
  for collection in ("params", "batch_stats"):
    for path, value in sorted(flatten(variables.get(collection, {})).items()):
      if path.split("/", 1)[0] in prefix:
        digest.update(f"{collection}/{path}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()[:32]


@dataclasses.dataclass(frozen=True, eq=False)
class CachedDataset(pipeline.Dataset):
  """A `Dataset` whose "image" is a frozen prefix's output, read from a cache.

  Batches hold the same examples, in the same order and padding, as the
  image dataset it replaces.
  """
  features: np.ndarray = dataclasses.field(default=None, repr=False)
  cached_labels: np.ndarray = dataclasses.field(default=None, repr=False)

  def _batch(self, epoch: int, step: int, workers, allocate=None) -> dict[str, np.ndarray]:
    del workers, allocate  # rows of an array, in this process (num_workers=0)
    positions = self._positions(epoch, step)
    real = positions >= 0
    rows = np.zeros((self.local_batch_size, *self.features.shape[1:]), np.float32)
    rows[real] = self.features[positions[real]]
    labels = np.zeros((self.local_batch_size,), np.int32)
    labels[real] = self.cached_labels[positions[real]]
    batch = {"image": rows, "label": labels}
    if not self.training:
      batch["mask"] = real.astype(np.float32)
    return batch

  def device_transform(self):
    """Cached features enter the step as they are (they were computed from normalised images)."""
    return _unchanged


def _unchanged(x):
  return x


def cached_dataset(dataset: pipeline.Dataset, features: np.ndarray,
                   labels: np.ndarray) -> CachedDataset:
  """`dataset` with its images replaced by `features` (one row per example, in order)."""
  if len(features) != dataset.num_examples:
    raise ValueError(f"The cache has {len(features)} rows for {dataset.num_examples} examples.")
  fields = {f.name: getattr(dataset, f.name) for f in dataclasses.fields(pipeline.Dataset)}
  fields["num_workers"] = 0  # rows of an array: nothing to decode in other processes
  return CachedDataset(**fields, features=features, cached_labels=np.asarray(labels, np.int32))


def in_order(dataset: pipeline.Dataset, batch_size: int) -> pipeline.Dataset:
  """The same examples and preprocessing, once each, in order, padded (one process)."""
  if dataset.augment != "none":
    raise ValueError(f"A prefix cache needs deterministic preprocessing, but the data is "
                     f"augmented with {dataset.augment!r}; set data.augment='none'.")
  return dataclasses.replace(
      dataset, training=False, global_batch_size=batch_size, local_batch_size=batch_size,
      steps_per_epoch=-(-dataset.num_examples // batch_size), process_index=0, process_count=1)


def prefix_outputs(model_name: str, model, variables, dataset: pipeline.Dataset,
                   data_config, split: str, stage: str, batch_size: int,
                   directory: str = "", progress: bool = True, model_options: str = "",
                   ) -> tuple[np.ndarray, np.ndarray, bool]:
  """Stage `stage`'s output for every example of a dataset, from the cache or computed.

  Args:
    model_name: the registry name (part of the key).
    model: the backbone (any head; only the prefix runs).
    variables: its variables; only the prefix's enter the key.
    dataset: the run's dataset of the split (its examples, in its order);
      its preprocessing must be deterministic (`augment="none"`).
    data_config: `config.data` (its source and preprocessing enter the key).
    split: "train" or "eval".
    stage: the last frozen stage.
    batch_size: examples per forward pass.
    directory: the cache folder ("" = `default_directory()`).
    progress: show a progress bar while computing.
    model_options: `config.model.options` (part of the key: an option such
      as inception_v3's transform_input changes what the prefix computes).

  Returns:
    (features float32 (N, ...), labels int32 (N,), True if read from the cache).

  Raises:
    SkippedFileError: a file fails to decode (with `data.skip_bad_files`):
      the cache holds a row for every example, so it refuses, writing nothing.
  """
  directory = directory or default_directory()
  images = in_order(dataset, batch_size)
  names = list(model.stage_names)
  keys = {s: cache_key(model_name, model, s, variables, data_config, split,
                       images.example_ids, model_options) for s in names[:names.index(stage) + 1]}
  path = os.path.join(directory, keys[stage])
  if os.path.exists(os.path.join(path, "info.json")):
    return (np.load(os.path.join(path, "features.npy"), mmap_mode="r"),
            np.load(os.path.join(path, "labels.npy")), True)

  # Start from the deepest shallower stage already cached, else from the images.
  start = None
  for shallower in reversed(names[:names.index(stage)]):
    if os.path.exists(os.path.join(directory, keys[shallower], "info.json")):
      start = shallower
      break
  part = model.clone(input_stage=start, last_stage=stage, num_classes=None,
                     frozen_batchnorm=(".*",))
  if start is None:
    source = images
  else:
    earlier = np.load(os.path.join(directory, keys[start], "features.npy"), mmap_mode="r")
    source = cached_dataset(images, earlier,
                            np.load(os.path.join(directory, keys[start], "labels.npy")))
  prepare = source.device_transform()  # uint8 images are normalised; features pass
  run = jax.jit(lambda x: models.extract_features(part, variables, prepare(x), [stage])[stage])
  log.info("Prefix cache: computing %s outputs of the %s split from %s", stage, split,
           start or "the images")
  outputs, labels = [], []
  batches = source.batches(epoch=0)
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    batches = tqdm(batches, total=source.steps_per_epoch, desc=f"cache {stage} ({split})",
                   unit="batch", leave=False)
  for step, batch in enumerate(batches):
    if batch.get("skipped", np.zeros(0)).any():
      # An entry needs a row for every example, in order (`cached_dataset`);
      # refused before anything is written.
      position = step * batch_size + int(np.flatnonzero(batch["skipped"])[0])
      name = images.source.example_name(int(images.example_ids[position]))
      raise SkippedFileError(
          f"The prefix cache needs every example, but {name} fails to decode "
          "(data.skip_bad_files=True skips it). Replace or remove the file, or set "
          "config.prefix_cache.enabled=False to train from the images, skipping it.")
    real = batch["mask"] > 0
    outputs.append(np.asarray(run(batch["image"]), np.float32)[real])
    labels.append(batch["label"][real])
  features, labels = np.concatenate(outputs), np.concatenate(labels).astype(np.int32)
  if len(features) != images.num_examples:  # never write an entry that is short
    raise RuntimeError(f"Computed {len(features)} rows for {images.num_examples} examples.")
  _write(path, features, labels, {"model": model_name, "stage": stage, "split": split,
                                  "computed_from": start or "images",
                                  "examples": int(len(labels)),
                                  "shape": list(features.shape[1:])})
  return features, labels, False


def _write(path: str, features: np.ndarray, labels: np.ndarray, info: dict[str, Any]) -> None:
  """Writes a cache entry atomically: a reader sees all of it or none."""
  # An entry another process wrote first is kept (it holds the same arrays).
  with files.atomic_directory(path) as staging:
    np.save(os.path.join(staging, "features.npy"), features)
    np.save(os.path.join(staging, "labels.npy"), labels)
    files.write_json(os.path.join(staging, "info.json"), info)
