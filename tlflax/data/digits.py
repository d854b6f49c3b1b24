"""The offline demo data: scikit-learn's handwritten digits as a local TFDS dataset.

scikit-learn ships 1797 greyscale 8x8 digit scans inside the package, so this
dataset is built without any download. It is split into two related tasks for
transfer learning:

    tlflax_digits/source   digits 0-4, labels 0..4
    tlflax_digits/target   digits 5-9, relabelled 0..4 (class names "5".."9")

Each has a fixed stratified 80/20 `train`/`test` split. Images are upscaled to
32x32 (bilinear) and the grey value is copied into three channels, so
CIFAR-sized RGB networks take them as they are.

`prepare(config_name, data_dir)` writes the dataset on first use; the data is
then read like every other TFDS dataset:

    >>> prepare("source", "/tmp/tfds")
    >>> tfds.builder("tlflax_digits/source", data_dir="/tmp/tfds").as_dataset(split="train")
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import numpy as np
from PIL import Image

from tlflax.data import tensorflow_setup

# Through tlflax, so TensorFlow stays off the accelerators.
tfds = tensorflow_setup.import_tfds()

DATASET_NAME = "tlflax_digits"
CONFIG_NAMES = ("source", "target")
IMAGE_SIZE = 32
TEST_FRACTION = 0.2
# Fixes the train/test split; changing it changes the dataset (bump VERSION).
SPLIT_SEED = 0
# The digits of each task, in label order.
_TASK_DIGITS = {"source": (0, 1, 2, 3, 4), "target": (5, 6, 7, 8, 9)}
# load_digits pixels are counts of set pixels in 4x4 blocks: 0..16.
_MAX_PIXEL = 16.0


class TlflaxDigits(tfds.core.GeneratorBasedBuilder):
  """Handwritten digits 0-4 ("source") or 5-9 ("target") as 32x32 RGB images."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=name, description=f"Digits {_TASK_DIGITS[name]}.")
      for name in CONFIG_NAMES
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    digits = _TASK_DIGITS[self.builder_config.name]
    return self.dataset_info_from_configs(
        description=("scikit-learn's 8x8 handwritten digits, upscaled to 32x32 RGB; "
                     "one half of the digits per task."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "label": tfds.features.ClassLabel(names=[str(d) for d in digits]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    images, labels = task_arrays(self.builder_config.name)
    train_index, test_index = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return {
        "train": self._generate_examples(images[train_index], labels[train_index], train_index),
        "test": self._generate_examples(images[test_index], labels[test_index], test_index),
    }

  def _generate_examples(self, images, labels, ids):
    for image, label, example_id in zip(images, labels, ids):
      yield int(example_id), {"image": image, "label": int(label)}


def task_arrays(config_name: str) -> tuple[np.ndarray, np.ndarray]:
  """The images and labels of one task, before the train/test split.

  Args:
    config_name: "source" or "target".

  Returns:
    (uint8 images (N, 32, 32, 3), int64 labels (N,) in 0..4), in
    scikit-learn's order.
  """
  # Imported here: scikit-learn is only needed when the dataset is built.
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  if config_name not in _TASK_DIGITS:
    raise ValueError(f"Unknown digits task {config_name!r}; use one of {CONFIG_NAMES}.")
  digits = load_digits()
  task_digits = np.asarray(_TASK_DIGITS[config_name])
  keep = np.isin(digits.target, task_digits)
  labels = np.searchsorted(task_digits, digits.target[keep]).astype(np.int64)
  images = np.stack([upscale(image) for image in digits.images[keep]])
  return images, labels


def upscale(image: np.ndarray) -> np.ndarray:
  """An 8x8 digit (values 0..16) -> uint8 (32, 32, 3), bilinear, grey in all channels.

  Args:
    image: float (8, 8) from `load_digits().images`.

  Returns:
    uint8 (32, 32, 3).
  """
  grey = np.clip(np.round(image * (255.0 / _MAX_PIXEL)), 0, 255).astype(np.uint8)
  large = Image.fromarray(grey, "L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
  return np.repeat(np.asarray(large)[:, :, None], 3, axis=2)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices so every class keeps the same train/test proportion.

  Args:
    labels: int (N,).
    test_fraction: share of each class that goes to the test split.
    seed: fixes which examples go where.

  Returns:
    (train indices, test indices), each sorted.
  """
  rng = np.random.default_rng(seed)
  train, test = [], []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    num_test = int(round(len(members) * test_fraction))
    test.append(members[:num_test])
    train.append(members[num_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def default_data_dir() -> str:
  """Where TFDS keeps datasets when no data_dir is given (~/tensorflow_datasets)."""
  return os.path.expanduser(tfds.core.constants.DATA_DIR)


def prepare(config_name: str, data_dir: str = "", file_format: str = "tfrecord") -> str:
  """Writes `tlflax_digits/<config_name>` into `data_dir` unless it is there already.

  Safe when several processes call it at once: they take turns on a lock file
  and only the first one writes. TFDS itself writes into a temporary folder
  and renames it at the end, so an interrupted run leaves no half dataset.

  Args:
    config_name: "source" or "target".
    data_dir: TFDS data dir; "" = the TFDS default.
    file_format: "tfrecord" or "array_record" (random access).

  Returns:
    The data_dir used.
  """
  if config_name not in CONFIG_NAMES:
    raise ValueError(f"Unknown digits task {config_name!r}; use one of {CONFIG_NAMES}.")
  data_dir = data_dir or default_data_dir()
  builder = tfds.builder(f"{DATASET_NAME}/{config_name}", data_dir=data_dir)
  if builder.is_prepared():
    return data_dir
  lock_dir = os.path.join(data_dir, DATASET_NAME)
  os.makedirs(lock_dir, exist_ok=True)
  with _file_lock(os.path.join(lock_dir, f".{config_name}.lock")):
    # Another process may have written it while this one waited for the lock.
    builder = tfds.builder(f"{DATASET_NAME}/{config_name}", data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(
          file_format=file_format,
          download_config=tfds.download.DownloadConfig(
              try_download_gcs=False,
              # Statistics are not needed and would only slow the first run.
              compute_stats=tfds.download.ComputeStatsMode.SKIP,
          ))
  return data_dir


@contextlib.contextmanager
def _file_lock(path: str):
  """Holds an exclusive advisory lock on `path` (POSIX flock) inside the block."""
  with open(path, "a", encoding="utf-8") as handle:
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
