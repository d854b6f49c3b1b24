"""The input pipeline: determinism, exact resume, process sharding, sources, offline errors."""

import hashlib
import os
import threading
import time

import numpy as np
from PIL import Image
import pytest

from conftest import shared_data
from tlflax import data, defaults
from tlflax.data import datasets, digits, pipeline, sources, transforms
from tlflax.data import images as images_lib


def data_config(**overrides):
  config = defaults.base_config().data
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """Both digits tasks prepared once (TFRecord, as `build` prepares them)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  for task in digits.CONFIG_NAMES:
    digits.prepare(task, path)
  return path


def digits_config(digits_dir, **overrides):
  return data_config(source="digits", name="source", data_dir=digits_dir, **overrides)


def all_batches(dataset, epoch=0, start_batch=0):
  return list(dataset.batches(epoch=epoch, start_batch=start_batch))


def assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def image_hashes(images):
  return {hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images}


# ---------------------------------------------------------------- digits builder


def test_digits_tasks_have_expected_classes_and_shapes(digits_dir):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  all_targets = load_digits().target
  arrays = {}
  for task, task_digits in (("source", range(5)), ("target", range(5, 10))):
    builder = tfds.builder(f"tlflax_digits/{task}", data_dir=digits_dir)
    assert builder.info.features["label"].names == [str(d) for d in task_digits]
    splits = {s: tfds.as_numpy(builder.as_dataset(split=s, batch_size=-1))
              for s in ("train", "test")}
    counts = sum(np.bincount(splits[s]["label"], minlength=5) for s in splits)
    np.testing.assert_array_equal(counts, [np.sum(all_targets == d) for d in task_digits])
    for split in splits.values():
      assert split["image"].shape[1:] == (32, 32, 3) and split["image"].dtype == np.uint8
      # Grey copied into every channel.
      np.testing.assert_array_equal(split["image"][..., 0], split["image"][..., 2])
    # Stratified: every class has about 20% of its examples in test.
    test_share = np.bincount(splits["test"]["label"], minlength=5) / counts
    np.testing.assert_allclose(test_share, 0.2, atol=0.01)
    arrays[task] = np.concatenate([splits["train"]["image"], splits["test"]["image"]])
  # Different digits: no image appears in both tasks.
  assert not image_hashes(arrays["source"]) & image_hashes(arrays["target"])


def test_digits_prepare_is_safe_from_two_threads_at_once(tmp_path):
  errors = []

  def prepare():
    try:
      digits.prepare("target", str(tmp_path))
    except Exception as error:  # pylint: disable=broad-except
      errors.append(error)

  threads = [threading.Thread(target=prepare) for _ in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors
  dataset = data.build(data_config(source="digits", name="target", data_dir=str(tmp_path)),
                       split="eval", training=False, global_batch_size=64)
  assert dataset.num_examples == 179 and dataset.class_names == ("5", "6", "7", "8", "9")


# ---------------------------------------------------------------- determinism and resume


def test_same_seed_same_batches_other_seed_or_epoch_other_batches(digits_dir):
  config = digits_config(digits_dir)
  first = data.build(config, "train", training=True, global_batch_size=64, seed=3)
  again = data.build(config, "train", training=True, global_batch_size=64, seed=3)
  other_seed = data.build(config, "train", training=True, global_batch_size=64, seed=4)
  assert first.steps_per_epoch == 721 // 64
  assert_batches_equal(all_batches(first, epoch=1), all_batches(again, epoch=1))
  assert not np.array_equal(first.batch(1, 0)["label"], other_seed.batch(1, 0)["label"])
  assert not np.array_equal(first.batch(1, 0)["label"], first.batch(2, 0)["label"])
  # An epoch sees distinct examples, the remainder dropped.
  images = np.concatenate([b["image"] for b in all_batches(first)])
  assert images.shape == (first.steps_per_epoch * 64, 32, 32, 3)


def test_resume_from_start_batch_yields_the_rest_of_the_epoch(digits_dir):
  config = digits_config(digits_dir, augment="random_resized_crop")
  dataset = data.build(config, "train", training=True, global_batch_size=32, seed=7)
  uninterrupted = all_batches(dataset, epoch=2)
  assert_batches_equal(all_batches(dataset, epoch=2, start_batch=5), uninterrupted[5:])
  # A fresh object (a restarted job) resumes the same way.
  restarted = data.build(config, "train", training=True, global_batch_size=32, seed=7)
  assert_batches_equal(all_batches(restarted, epoch=2, start_batch=21), uninterrupted[21:])
  # Stopping early (the prefetching generator is closed) leaves nothing behind.
  for step, _ in enumerate(dataset.batches(epoch=2)):
    if step == 1:
      break


@pytest.mark.parametrize("training", [True, False])
def test_process_parts_concatenate_to_the_single_process_batch(digits_dir, training):
  config = digits_config(digits_dir)
  split = "train" if training else "eval"
  single = data.build(config, split, training=training, global_batch_size=48, seed=1)
  parts = [data.build(config, split, training=training, global_batch_size=48, seed=1,
                      process_index=p, process_count=2) for p in range(2)]
  assert all(p.steps_per_epoch == single.steps_per_epoch for p in parts)
  assert all(p.num_examples == single.num_examples for p in parts)
  for step in (0, single.steps_per_epoch - 1):
    whole = single.batch(3, step)
    halves = [part.batch(3, step) for part in parts]
    assert halves[0]["image"].shape[0] == 24
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


def test_batch_size_must_divide_over_processes(digits_dir):
  with pytest.raises(ValueError, match="multiple of the process count"):
    data.build(digits_config(digits_dir), "train", training=True, global_batch_size=33,
               process_index=0, process_count=2)


# ---------------------------------------------------------------- evaluation


def test_eval_pads_the_last_batch_and_sees_every_example_once(digits_dir):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  config = digits_config(digits_dir)
  dataset = data.build(config, "eval", training=False, global_batch_size=64)
  batches = all_batches(dataset)
  assert dataset.num_examples == 180 and dataset.steps_per_epoch == 3
  assert all(b["image"].shape == (64, 32, 32, 3) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(192) < 180)
  # In order, each example once: the masked rows are the test split itself.
  expected = tfds.as_numpy(tfds.builder("tlflax_digits/source", data_dir=digits_dir)
                           .as_dataset(split="test", batch_size=-1))
  labels = np.concatenate([b["label"] for b in batches])[:180]
  np.testing.assert_array_equal(labels, expected["label"])
  images = np.concatenate([b["image"] for b in batches])[:180]
  # Batches leave the host as uint8, the dataset's pixels themselves ...
  assert images.dtype == np.uint8
  np.testing.assert_array_equal(images, expected["image"])
  # ... and the step normalises them on the device, as the host would in float32.
  on_device = np.asarray(dataset.device_transform()(images))
  # data.mean / data.std unset, and no weights to ask: ImageNet's.
  assert (dataset.preprocessing.mean, dataset.preprocessing.std) == (
      images_lib.IMAGENET_MEAN, images_lib.IMAGENET_STD)
  mean, std = np.asarray(dataset.preprocessing.mean), np.asarray(dataset.preprocessing.std)
  assert on_device.dtype == np.float32
  np.testing.assert_allclose(on_device, (expected["image"] / 255.0 - mean) / std, atol=1e-5)
  # XLA divides by a constant as a multiplication by its reciprocal, so the
  # device's values may differ from numpy's in the last bits: normalised
  # pixels are within |3|, where a float32 ulp is 2.4e-7; 2e-6 is 8 ulps.
  np.testing.assert_allclose(on_device, images_lib.normalize(images, dataset.preprocessing),
                             rtol=0, atol=2e-6)


# ---------------------------------------------------------------- few-shot subsets


def test_few_shot_subset_has_that_many_examples_per_class(digits_dir):
  config = digits_config(digits_dir, train_examples_per_class=6, augment="none")
  dataset = data.build(config, "train", training=True, global_batch_size=10, seed=0)
  assert dataset.num_examples == 30 and dataset.steps_per_epoch == 3
  labels = np.concatenate([b["label"] for b in all_batches(dataset)])
  np.testing.assert_array_equal(np.bincount(labels, minlength=5), [6] * 5)
  # Every epoch draws from the same subset; another seed picks another one.
  subset = image_hashes(np.concatenate([b["image"] for b in all_batches(dataset, epoch=0)]))
  assert subset == image_hashes(np.concatenate([b["image"] for b in all_batches(dataset, 5)]))
  other = data.build(config, "train", training=True, global_batch_size=10, seed=1)
  assert subset != image_hashes(np.concatenate([b["image"] for b in all_batches(other)]))
  # The eval split is never cut down.
  assert data.build(config, "eval", training=False, global_batch_size=10).num_examples == 180
  with pytest.raises(ValueError, match="has only"):
    data.build(digits_config(digits_dir, train_examples_per_class=1000), "train",
               training=True, global_batch_size=10)


def test_eval_on_unused_train_sees_every_image_the_run_did_not_train_on(digits_dir):
  config = digits_config(digits_dir, train_examples_per_class=6, augment="none",
                         eval_on_unused_train=True)
  for seed in (0, 1):
    train_images = np.concatenate([b["image"] for b in all_batches(
        data.build(config, "train", training=True, global_batch_size=10, seed=seed))])
    evaluation = data.build(config, "eval", training=False, global_batch_size=64, seed=seed)
    batches = all_batches(evaluation)
    mask = np.concatenate([b["mask"] for b in batches]) > 0
    eval_images = np.concatenate([b["image"] for b in batches])[mask]
    eval_labels = np.concatenate([b["label"] for b in batches])[mask]
    test_labels = datasets.load_source(config, "eval").labels()
    train_labels = datasets.load_source(config, "train").labels()
    assert evaluation.num_examples == len(eval_images) == len(test_labels) + len(train_labels) - 30
    assert image_hashes(eval_images).isdisjoint(image_hashes(train_images))
    everything = [b["image"][b["mask"] > 0] for b in all_batches(data.build(
        digits_config(digits_dir, augment="none", eval_split="train+test"), "eval",
        training=False, global_batch_size=64))]
    everything = np.concatenate(everything)
    assert image_hashes(eval_images) | image_hashes(train_images) == image_hashes(everything)
    np.testing.assert_array_equal(
        np.bincount(eval_labels, minlength=5),
        np.bincount(test_labels, minlength=5) + np.bincount(train_labels, minlength=5) - 6)


def test_concatenated_sources_need_the_same_classes():
  first = sources.ArraySource(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), ("a", "b"))
  second = sources.ArraySource(np.ones((1, 4, 4, 3), np.uint8), np.array([1]), ("a", "b"))
  joined = sources.ConcatSource([first, second])
  raws, labels = joined.read([2, 0])
  assert len(joined) == 3 and labels.tolist() == [1, 0]
  assert joined.decode(raws[0]).max() == 1 and joined.decode(raws[1]).max() == 0
  with pytest.raises(ValueError, match="different classes"):
    sources.ConcatSource([first, sources.ArraySource(first.pixels, first.all_labels, ("x", "y"))])


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("augment", ["crop_flip", "random_resized_crop"])
def test_augmentation_changes_images_but_keeps_shape(digits_dir, augment):
  plain = data.build(digits_config(digits_dir, augment="none"), "train", training=True,
                     global_batch_size=32, seed=0)
  augmented = data.build(digits_config(digits_dir, augment=augment), "train", training=True,
                         global_batch_size=32, seed=0)
  before, after = plain.batch(0, 0), augmented.batch(0, 0)
  assert after["image"].shape == before["image"].shape == (32, 32, 32, 3)
  assert after["image"].dtype == np.uint8
  np.testing.assert_array_equal(after["label"], before["label"])  # same order
  changed = [not np.array_equal(a, b) for a, b in zip(after["image"], before["image"])]
  assert np.mean(changed) > 0.5


def test_stateless_uniform_is_keyed_by_example_not_position():
  draws = transforms.stateless_uniform((3, 1), np.array([5, 9, 2]), 4)
  assert draws.shape == (3, 4) and np.all((draws >= 0) & (draws < 1))
  np.testing.assert_array_equal(transforms.stateless_uniform((3, 1), np.array([2]), 4)[0],
                                draws[2])
  assert not np.array_equal(transforms.stateless_uniform((3, 2), np.array([2]), 4)[0], draws[2])
  many = transforms.stateless_uniform((0, 0), np.arange(20000), 1)
  assert abs(many.mean() - 0.5) < 0.01


def test_random_resized_box_stays_inside_the_image():
  rng = np.random.default_rng(0)
  for height, width in ((32, 32), (50, 300), (300, 40)):
    for _ in range(50):
      top, left, box_h, box_w = transforms.random_resized_box(height, width, rng.random(40))
      assert 0 <= top and top + box_h <= height and 0 <= left and left + box_w <= width
      assert box_h > 0 and box_w > 0


# ---------------------------------------------------------------- image folders


def write_image_folder(root):
  """Two classes of mixed modes and sizes, in train/ and val/."""
  rng = np.random.default_rng(0)
  modes = [("RGB", 3), ("L", 1), ("RGBA", 4), ("P", 1)]
  sizes = [(40, 30), (17, 23), (64, 64), (12, 50)]
  for split, count in (("train", 6), ("val", 3)):
    for class_name in ("cat", "dog"):
      os.makedirs(root / split / class_name)
      for i in range(count):
        mode, channels = modes[i % len(modes)]
        width, height = sizes[(i + len(class_name)) % len(sizes)]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels,
                                "L" if channels == 1 else mode)
        if mode == "P":
          image = image.convert("P")
        image.save(root / split / class_name / f"{i}.png")
  (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_worker_processes_give_the_batches_of_threads(tmp_path, monkeypatch):
  """Grain's worker processes change where a batch is made, never what it holds."""
  write_image_folder(tmp_path)
  config = data_config(source="folder", path=str(tmp_path), eval_split="val", image_size=16,
                       resize_size=20, augment="random_resized_crop")
  monkeypatch.setattr(pipeline, "MIN_IMAGES_FOR_PROCESSES", 0)  # even for 12 images
  in_threads = data.build(config, "train", training=True, global_batch_size=4, seed=3,
                          num_workers=0)
  in_processes = data.build(config, "train", training=True, global_batch_size=4, seed=3,
                            num_workers=2)
  assert in_threads.num_workers == 0 and in_processes.num_workers == 2
  # Steps 2..7: the end of epoch 0, all of epoch 1, the start of epoch 2.
  expected = list(in_threads.stream(2, 8))
  for start in (2, 5):  # from the start, and resumed in the middle of epoch 1
    got = list(in_processes.stream(start, 8))
    assert len(got) == 8 - start
    for mine, theirs in zip(got, expected[start - 2:]):
      np.testing.assert_array_equal(mine["image"], theirs["image"])
      np.testing.assert_array_equal(mine["label"], theirs["label"])
  # A stream is the epochs' batches one after another.
  epoch1 = all_batches(in_threads, epoch=1)
  for mine, theirs in zip(expected[1:4], epoch1):
    np.testing.assert_array_equal(mine["image"], theirs["image"])


def test_worker_processes_make_one_batch_at_a_time(tmp_path, monkeypatch):
  """Each worker makes its batches in its own loop, one at a time: Grain's
  default read options (16 threads, 500 elements a process) would run 16
  batches at once in every worker, on cores that `num_workers` did not ask for."""
  import grain
  write_image_folder(tmp_path)
  config = data_config(source="folder", path=str(tmp_path), eval_split="val", image_size=16)
  monkeypatch.setattr(pipeline, "MIN_IMAGES_FOR_PROCESSES", 0)
  seen = {}
  original = grain.MapDataset.to_iter_dataset

  def spy(self, read_options=None, **kwargs):
    seen.setdefault("read", read_options)  # the first call is tlflax's (then Grain's own)
    return original(self, read_options, **kwargs)

  monkeypatch.setattr(grain.MapDataset, "to_iter_dataset", spy)
  train = data.build(config, "train", training=True, global_batch_size=4, num_workers=2)
  assert len(list(train.stream(0, 3))) == 3
  assert seen["read"].num_threads == 0 and seen["read"].prefetch_buffer_size == 0
  assert 1 <= pipeline.WORKER_BUFFERED_BATCHES <= 4


def test_padded_batches_from_reused_worker_blocks_are_those_of_threads(tmp_path, monkeypatch):
  """Workers write batches into reused shared memory: a padded batch written
  over a full one still has zeros in its padding, and every batch is the one
  threads make."""
  write_image_folder(tmp_path)
  config = data_config(source="folder", path=str(tmp_path), eval_split="val", image_size=16,
                       resize_size=20)
  monkeypatch.setattr(pipeline, "MIN_IMAGES_FOR_PROCESSES", 0)
  in_threads = data.build(config, "eval", training=False, global_batch_size=4, num_workers=0)
  # One worker: it makes full and padded batches in turn.
  in_processes = data.build(config, "eval", training=False, global_batch_size=4,
                            num_workers=1)
  assert in_threads.steps_per_epoch == 2  # 6 images: a full batch, then 2 real + 2 padding
  expected = all_batches(in_threads)
  # 12 passes: the worker's few blocks are written over many times.
  got = list(in_processes.stream(0, 24))
  for step, batch in enumerate(got):
    assert_batches_equal([batch], [expected[step % 2]])
  assert not got[1]["image"][2:].any()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="lists shared memory in /dev/shm")
def test_a_stream_closed_early_leaves_no_shared_memory(tmp_path, monkeypatch):
  """Blocks still in the workers' queues when the stream stops are removed."""
  from tlflax.data import shared_blocks
  write_image_folder(tmp_path)
  config = data_config(source="folder", path=str(tmp_path), eval_split="val", image_size=16,
                       augment="random_resized_crop")
  monkeypatch.setattr(pipeline, "MIN_IMAGES_FOR_PROCESSES", 0)
  train = data.build(config, "train", training=True, global_batch_size=4, num_workers=2)
  prefix = shared_blocks.block_name_prefix(os.getpid())
  stream = train.stream(0, 1000)
  next(stream)
  deadline = time.monotonic() + 60
  while not [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]:
    assert time.monotonic() < deadline, "the workers made no blocks waiting in their queues"
    time.sleep(0.05)
  stream.close()  # stops the workers
  assert [name for name in os.listdir("/dev/shm") if name.startswith(prefix)] == []


def test_batches_read_ahead_outlive_the_workers_that_made_them(tmp_path, monkeypatch):
  """Two workers, one batch each: Grain reads both batches ahead and stops
  each worker once past its last batch. The second batch, taken only after
  both workers have exited, is still there (its block once vanished with its
  worker: FileNotFoundError)."""
  import multiprocessing  # pylint: disable=import-outside-toplevel
  write_image_folder(tmp_path)
  config = data_config(source="folder", path=str(tmp_path), eval_split="val", image_size=16)
  monkeypatch.setattr(pipeline, "MIN_IMAGES_FOR_PROCESSES", 0)
  evaluation = data.build(config, "eval", training=False, global_batch_size=4, num_workers=2)
  expected = all_batches(data.build(config, "eval", training=False, global_batch_size=4,
                                    num_workers=0))
  assert len(expected) == 2
  before = set(multiprocessing.active_children())
  stream = evaluation.stream(0, 2)
  got = [next(stream)]
  deadline = time.monotonic() + 60
  while set(multiprocessing.active_children()) - before:  # Grain joins a worker it stops
    assert time.monotonic() < deadline, "Grain did not stop its workers after their last batch"
    time.sleep(0.05)
  got += list(stream)
  assert_batches_equal(got, expected)


def test_decoded_files_take_the_same_transforms_as_arrays(tmp_path):
  """Files stay PIL images from decoding to the crop (no full-size copies):
  the pixels are those of the array path, which are torchvision's."""
  torchvision_transforms = pytest.importorskip("torchvision.transforms.functional")
  rng = np.random.default_rng(0)
  path = tmp_path / "photo.jpg"
  Image.fromarray(rng.integers(0, 256, (75, 100, 3), np.uint8)).save(path, quality=90)
  image = images_lib.open_rgb(path)
  pixels = images_lib.read_rgb(path)
  assert image.mode == "RGB" and image.size == (100, 75)
  np.testing.assert_array_equal(np.asarray(image), pixels)
  uniforms = transforms.stateless_uniform((0, 0), np.arange(16),
                                          transforms.num_draws("random_resized_crop"))
  for row in uniforms:
    from_image = transforms.train_transform(image, row, "random_resized_crop", 32)
    np.testing.assert_array_equal(
        from_image, transforms.train_transform(pixels, row, "random_resized_crop", 32))
    # torchvision's RandomResizedCrop on the same box, then its flip.
    top, left, height, width = transforms.random_resized_box(75, 100, row)
    expected = torchvision_transforms.resized_crop(image, top, left, height, width, [32, 32])
    if row[-1] < 0.5:
      expected = torchvision_transforms.hflip(expected)
    np.testing.assert_array_equal(from_image, np.asarray(expected))
  np.testing.assert_array_equal(transforms.eval_transform(image, 32, 40),
                                transforms.eval_transform(pixels, 32, 40))


def test_file_sources_use_worker_processes_by_default(tmp_path):
  write_image_folder(tmp_path)
  config = data_config(source="folder", path=str(tmp_path), eval_split="val", image_size=16)
  assert data.build(config, "train", training=True, global_batch_size=4).num_workers == (
      os.cpu_count() or 1)
  config.num_workers = 0
  assert data.build(config, "train", training=True, global_batch_size=4).num_workers == 0


@pytest.mark.parametrize("augment", ["crop_flip", "random_resized_crop", "none"])
def test_image_folder_of_mixed_sizes_and_modes(tmp_path, augment):
  write_image_folder(tmp_path)
  config = data_config(source="folder", path=str(tmp_path), eval_split="val", image_size=16,
                       resize_size=20, augment=augment)
  train = data.build(config, "train", training=True, global_batch_size=4, seed=0)
  assert train.class_names == ("cat", "dog") and train.num_examples == 12
  batches = all_batches(train)
  assert len(batches) == 3 and batches[0]["image"].shape == (4, 16, 16, 3)
  assert sorted(np.concatenate([b["label"] for b in batches]).tolist()) == [0] * 6 + [1] * 6
  evaluation = data.build(config, "eval", training=False, global_batch_size=4)
  batches = all_batches(evaluation)
  assert evaluation.num_examples == 6 and len(batches) == 2
  assert np.concatenate([b["mask"] for b in batches]).sum() == 6
  assert np.concatenate([b["image"] for b in batches]).dtype == np.uint8


def test_image_folder_slices_are_disjoint_and_cover_everything(tmp_path):
  write_image_folder(tmp_path)
  first = sources.folder_source(str(tmp_path / "train"), ".[:75%]")
  rest = sources.folder_source(str(tmp_path / "train"), ".[75%:]")
  assert len(first) == 9 and len(rest) == 3
  assert not set(first.items) & set(rest.items)
  assert len(set(first.items) | set(rest.items)) == 12
  assert first.items == sources.folder_source(str(tmp_path / "train"), ".[:75%]").items
  with pytest.raises(FileNotFoundError, match="sub-folders of"):
    sources.folder_source(str(tmp_path), "test")


def test_hymenoptera_folder():
  root = shared_data("hymenoptera")
  config = data_config(source="folder", path=str(root), eval_split="val", image_size=64,
                       resize_size=72, augment="random_resized_crop")
  evaluation = data.build(config, "eval", training=False, global_batch_size=32)
  assert evaluation.class_names == ("ants", "bees") and evaluation.num_examples == 153
  batch = evaluation.batch(0, 4)  # the last, padded batch
  assert batch["image"].shape == (32, 64, 64, 3) and batch["mask"].sum() == 153 - 4 * 32
  train = data.build(config, "train", training=True, global_batch_size=8, seed=0)
  assert train.num_examples == 245
  assert train.batch(0, 0)["image"].shape == (8, 64, 64, 3)


# ---------------------------------------------------------------- files that fail to decode


def write_jpeg_folder(root, cut=(), per_class=(6, 3)):
  """Noise JPEGs (every image different) of two classes in train/ and val/; the files named
  in `cut` (relative paths) are cut short after their header, as an interrupted copy leaves
  them: the pre-training header check passes them, decoding fails."""
  rng = np.random.default_rng(0)
  for split, count in zip(("train", "val"), per_class):
    for class_name in ("cat", "dog"):
      os.makedirs(root / split / class_name)
      for i in range(count):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / class_name / f"{i}.jpg", quality=90)
  for name in cut:
    path = root / name
    whole = path.read_bytes()
    path.write_bytes(whole[:whole.rindex(b"\xff\xda") + 100])  # 100 bytes of pixel data
    assert images_lib.check_header(path) is None  # the header still reads
  return root


def jpeg_config(root, **overrides):
  return data_config(source="folder", path=str(root), eval_split="val", image_size=16,
                     resize_size=20, augment="random_resized_crop", **overrides)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_truncated_jpeg_stops_the_stream_with_its_name(tmp_path, monkeypatch, num_workers):
  bad = tmp_path / "train" / "cat" / "2.jpg"
  write_jpeg_folder(tmp_path, cut=["train/cat/2.jpg"])
  monkeypatch.setattr(pipeline, "MIN_IMAGES_FOR_PROCESSES", 0)  # worker processes for 3 steps
  train = data.build(jpeg_config(tmp_path), "train", training=True, global_batch_size=4, seed=3,
                     num_workers=num_workers)
  with pytest.raises(images_lib.ImageError,
                     match=f"^Cannot read {bad} as an image: image file is truncated .*Replace or "
                           "remove it, or set config.data.skip_bad_files=True to skip files"):
    list(train.stream(0, 3))  # one epoch: every file


def test_skip_bad_files_puts_the_next_example_of_the_epoch_in_a_bad_files_place(
    tmp_path, monkeypatch, caplog):
  bad = str(tmp_path / "train" / "cat" / "2.jpg")
  write_jpeg_folder(tmp_path, cut=["train/cat/2.jpg"])
  config = jpeg_config(tmp_path, skip_bad_files=True)
  monkeypatch.setattr(pipeline, "MIN_IMAGES_FOR_PROCESSES", 0)
  in_threads = data.build(config, "train", training=True, global_batch_size=4, seed=3,
                          num_workers=0)
  in_processes = data.build(config, "train", training=True, global_batch_size=4, seed=3,
                            num_workers=2)
  paths = list(in_threads.source.items)
  assert in_threads.num_examples == 12 and bad in paths  # the header check kept it
  with caplog.at_level("WARNING", logger="tlflax.data.pipeline"):
    batches = list(in_threads.stream(0, 6))  # two epochs
  warnings = [r.getMessage() for r in caplog.records if "fails to decode" in r.getMessage()]
  assert len(warnings) == 1, warnings  # once per file, not once per epoch
  assert f"Cannot read {bad} as an image: image file is truncated" in warnings[0]

  draws = transforms.num_draws("random_resized_crop")
  for step, batch in enumerate(batches):
    epoch, number = divmod(step, 3)
    order = pipeline.epoch_order(12, 3, epoch)
    assert batch["image"].shape == (4, 16, 16, 3)  # full
    for row in range(4):
      where = number * 4 + row  # in the epoch's order
      own = int(in_threads.example_ids[order[where]])
      taken = int(in_threads.example_ids[order[(where + 1) % 12]]) if paths[own] == bad else own
      assert batch["skipped"][row] == (paths[own] == bad)
      # The example that takes the place, in the view the replaced row draws.
      uniforms = transforms.stateless_uniform((3, epoch), [own], draws)[0]
      expected = transforms.train_transform(images_lib.open_rgb(paths[taken]), uniforms,
                                            "random_resized_crop", 16, 20)
      np.testing.assert_array_equal(batch["image"][row], expected, err_msg=f"{step} {row}")
      assert batch["label"][row] == in_threads.source.labels()[taken]
  assert sum(int(b["skipped"].sum()) for b in batches) == 2  # once in each epoch

  # Worker processes make the same batches and warn once too; a resumed stream is the same.
  caplog.clear()
  with caplog.at_level("WARNING", logger="tlflax.data.pipeline"):
    assert_batches_equal(list(in_processes.stream(0, 6)), batches)
  assert len([r for r in caplog.records if "fails to decode" in r.getMessage()]) == 1
  assert_batches_equal(list(in_threads.stream(2, 5)), batches[2:5])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_bad_files_leaves_a_bad_eval_image_out_and_marks_it(tmp_path, monkeypatch,
                                                                 num_workers):
  bad = str(tmp_path / "val" / "dog" / "1.jpg")
  write_jpeg_folder(tmp_path, cut=["val/dog/1.jpg"])
  monkeypatch.setattr(pipeline, "MIN_IMAGES_FOR_PROCESSES", 0)
  evaluation = data.build(jpeg_config(tmp_path, skip_bad_files=True), "eval", training=False,
                          global_batch_size=4, num_workers=num_workers)
  paths = list(evaluation.source.items)
  batches = list(evaluation.stream(0, 2))
  mask = np.concatenate([b["mask"] for b in batches])
  skipped = np.concatenate([b["skipped"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  row = paths.index(bad)
  assert mask.tolist() == [float(i != row) for i in range(6)] + [0.0, 0.0]  # 2 of padding
  assert skipped.tolist() == [int(i == row) for i in range(8)]
  assert not images[row].any()
  for i, path in enumerate(paths):
    if i != row:
      np.testing.assert_array_equal(
          images[i], transforms.eval_transform(images_lib.open_rgb(path), 16, 20))
  without = data.build(jpeg_config(tmp_path), "eval", training=False, global_batch_size=4,
                       num_workers=num_workers)
  with pytest.raises(images_lib.ImageError, match=f"Cannot read {bad} as an image"):
    list(without.stream(0, 6))


def test_a_training_run_skips_a_truncated_jpeg_only_when_asked(tmp_path, capsys, caplog):
  from conftest import metric_lines  # pylint: disable=import-outside-toplevel
  from tlflax.cli import train as train_cli  # pylint: disable=import-outside-toplevel
  root = write_jpeg_folder(tmp_path / "images", cut=["train/cat/2.jpg", "val/dog/1.jpg"],
                           per_class=(4, 3))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [f"--config={repo}/configs/digits.py", "--config.num_train_steps=4",
          "--config.batch_size=8", "--config.eval_batch_size=8", "--config.log_every_steps=1",
          "--config.eval_every_steps=2", "--config.data.source=folder",
          f"--config.data.path={root}", "--config.data.train_split=train",
          "--config.data.eval_split=val", "--config.data.augment=none",
          "--config.data.num_workers=0"]
  assert train_cli.main([*args, f"--workdir={tmp_path}/stopped"]) == 1
  errors = [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("tlflax.main: error: ")]
  assert len(errors) == 1 and errors[0].startswith(
      f"tlflax.main: error: Cannot read {root}/train/cat/2.jpg as an image: image file is "
      "truncated")
  assert "set config.data.skip_bad_files=True" in errors[0]

  caplog.set_level("WARNING")
  assert train_cli.main([*args, "--config.data.skip_bad_files=True",
                         f"--workdir={tmp_path}/skipped"]) == 0
  for name in ("train/cat/2.jpg", "val/dog/1.jpg"):  # each named once
    assert caplog.text.count(f"fails to decode (data.skip_bad_files=True): Cannot read "
                             f"{root}/{name} as an image") == 1
  assert "Evaluation left out 1 of 6 examples whose files fail to decode" in caplog.text
  lines = metric_lines(tmp_path / "skipped")
  train_lines = [lines[(step, "train")] for step in range(1, 5)]
  # 8 train files, a batch of 8 (one for each of the 8 test devices): every
  # batch holds the bad file once, in another view of its replacement each epoch.
  assert [line["skipped_files"] for line in train_lines] == [1, 1, 1, 1]
  for step in (2, 4):
    assert lines[(step, "eval")]["skipped_files"] == 1  # of 6: the accuracy is over 5
  # The log line says so beside the accuracy it changes.
  from tlflax.training import metrics  # pylint: disable=import-outside-toplevel
  assert metrics.format_line(4, 4, "eval", lines[(4, "eval")]).endswith(", skipped_files 1")


def test_dali_refuses_to_skip_and_names_a_truncated_jpeg_whatever_the_crop(tmp_path,
                                                                          monkeypatch):
  pytest.importorskip("nvidia.dali")
  write_jpeg_folder(tmp_path, cut=["train/cat/2.jpg", "val/dog/1.jpg"])
  config = jpeg_config(tmp_path, engine="dali_cpu", skip_bad_files=True)
  with pytest.raises(ValueError, match="data.engine='dali_cpu' cannot skip files that fail to "
                                       "decode \\(data.skip_bad_files=True\\)"):
    data.build(config, "train", training=True, global_batch_size=4)
  config.skip_bad_files = False
  # DALI decodes only the crop's rows: a crop inside the part that is there
  # would decode without complaint. The end-of-image check stops it whatever the box.
  for training, split, bad in ((True, "train", tmp_path / "train" / "cat" / "2.jpg"),
                               (False, "eval", tmp_path / "val" / "dog" / "1.jpg")):
    dataset = data.build(config, split, training=training, global_batch_size=4, seed=3)
    with pytest.raises(images_lib.ImageError,
                       match=f"^{bad} is cut short: .*use data.engine='pil' with "
                             "data.skip_bad_files=True to skip it."):
      list(dataset.stream(0, dataset.steps_per_epoch))
  # A file DALI fails on anyway (here: the check above left out) is named too,
  # not left as DALI's "Failed to decode sample #3".
  from tlflax.data import dali_engine  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(dali_engine, "jpeg_cut_short", lambda data: False)
  with pytest.raises(images_lib.ImageError,
                     match=f"^Cannot read {bad} as an image: image file is truncated .*"
                           "data.engine='dali_cpu' cannot skip files that fail to decode"):
    list(dataset.stream(0, dataset.steps_per_epoch))  # the eval split: whole images


def test_jpeg_cut_short_finds_files_cut_anywhere_and_only_those():
  import io  # pylint: disable=import-outside-toplevel
  from tlflax.data import dali_engine  # pylint: disable=import-outside-toplevel
  pixels = np.random.default_rng(0).integers(0, 256, (64, 80, 3), np.uint8)

  def encoded(image, **options):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()

  thumbnail = encoded(Image.fromarray(pixels[:8, :8]))
  plain = encoded(Image.fromarray(pixels), quality=90)
  files = {
      "baseline": plain,
      "progressive": encoded(Image.fromarray(pixels), progressive=True),
      "greyscale with restart markers": encoded(Image.fromarray(pixels).convert("L"),
                                                restart_marker_blocks=2),
      # A whole JPEG inside an APP1 segment, as an EXIF thumbnail sits.
      "thumbnail": plain[:2] + b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big")
                   + thumbnail + plain[2:],
  }
  for name, whole in files.items():
    Image.open(io.BytesIO(whole)).load()  # a valid file
    assert not dali_engine.jpeg_cut_short(whole), name
    assert not dali_engine.jpeg_cut_short(whole + b"\xff\xd8 a second picture \xff\xda"), name
    for length in (len(whole) - 1, len(whole) - 2, len(whole) - 60, len(whole) // 2):
      assert dali_engine.jpeg_cut_short(whole[:length]), (name, length)


# ---------------------------------------------------------------- TFDS reading


def test_tfds_array_record_reads_like_tfrecord(digits_dir, tmp_path):
  digits.prepare("source", str(tmp_path), file_format="array_record")
  from_tfrecord = data.build(digits_config(digits_dir), "eval", training=False,
                             global_batch_size=64)
  config = data_config(source="tfds", name="tlflax_digits/source", data_dir=str(tmp_path),
                       eval_split="test[:50%]")
  from_array_record = data.build(config, "eval", training=False, global_batch_size=64)
  assert isinstance(from_array_record.source, sources.TfdsRandomAccessSource)
  assert from_array_record.num_examples == 90
  np.testing.assert_array_equal(  # TFDS writes both formats in the same order
      from_array_record.batch(0, 0)["image"], from_tfrecord.batch(0, 0)["image"])
  few_shot = data.build(data_config(source="tfds", name="tlflax_digits/source",
                                    data_dir=str(tmp_path), train_examples_per_class=3),
                        "train", training=True, global_batch_size=5)
  labels = np.concatenate([b["label"] for b in all_batches(few_shot)])
  np.testing.assert_array_equal(np.bincount(labels), [3] * 5)


def test_tfds_images_of_varying_size_stay_encoded_until_read(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class TlflaxTestVaryingSizes(tfds.core.GeneratorBasedBuilder):
    """Eight RGB images of different sizes (no fixed image shape)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      # Not dataset_info_from_configs: it looks for metadata files beside the
      # builder's package, and a test module is no package.
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(),
              "label": tfds.features.ClassLabel(names=["small", "large"])}),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(8):
        side = 10 + 5 * i
        yield i, {"image": np.full((side, side + 3, 3), 20 * i, np.uint8), "label": i // 4}

  TlflaxTestVaryingSizes(data_dir=str(tmp_path)).download_and_prepare()
  config = data_config(source="tfds", name="tlflax_test_varying_sizes", data_dir=str(tmp_path),
                       eval_split="train", image_size=8)
  dataset = data.build(config, "eval", training=False, global_batch_size=8)
  assert isinstance(dataset.source, sources.EncodedSource)
  batch = dataset.batch(0, 0)
  assert batch["image"].shape == (8, 8, 8, 3)
  # Each image is one flat colour, 20 * i, and stays so after resizing.
  pixels = batch["image"][:, 0, 0, 0]
  order = np.argsort(pixels)
  np.testing.assert_array_equal(pixels[order], 20 * np.arange(8))
  np.testing.assert_array_equal(batch["label"][order], np.arange(8) // 4)


@pytest.mark.parametrize("name", ["cifar10", "no_such_dataset_anywhere"])
def test_unprepared_tfds_dataset_fails_at_once_with_instructions(tmp_path, name):
  config = data_config(source="tfds", name=name, data_dir=str(tmp_path))
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as error:
    data.build(config, "train", training=True, global_batch_size=8)
  assert time.monotonic() - start < 5.0
  message = str(error.value)
  assert name in message and str(tmp_path) in message and "tfds build" in message


# ---------------------------------------------------------------- TFDS splits larger than memory


def _define_sharded_test_builder():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class TlflaxTestShardedSizes(tfds.core.GeneratorBasedBuilder):
    """Thirty PNG images of different sizes and colours, written as three shards."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(),
              "label": tfds.features.ClassLabel(names=["a", "b", "c"])}),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(30):
        side = 6 + i % 7
        image = np.full((side, side + 2, 3), (8 * i, 255 - 8 * i, i % 5 * 50), np.uint8)
        yield i, {"image": image, "label": i % 3}

  return TlflaxTestShardedSizes


@pytest.fixture(scope="module")
def sharded_tfds(tmp_path_factory):
  """The same 30-image dataset prepared as TFRecord and as ArrayRecord, 3 shards each."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder_class = _define_sharded_test_builder()
  data_dirs = {}
  for file_format in ("tfrecord", "array_record"):
    data_dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
    builder_class(data_dir=data_dirs[file_format], file_format=file_format).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False, num_shards=3))
  return "tlflax_test_sharded_sizes", data_dirs


@pytest.mark.parametrize("split", ["train", "train[4:23]", "train[50%:]"])
def test_large_tfrecord_split_reads_by_random_access_the_same_examples(
    sharded_tfds, split, tmp_path, monkeypatch):
  import pickle  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("TLFLAX_CACHE_DIR", str(tmp_path / "cache"))
  name, data_dirs = sharded_tfds
  in_memory = sources.tfds_source(name, data_dirs["tfrecord"], split)
  indexed = sources.tfds_source(name, data_dirs["tfrecord"], split, in_memory_limit_bytes=0)
  array_record = sources.tfds_source(name, data_dirs["array_record"], split,
                                     in_memory_limit_bytes=0)
  assert isinstance(in_memory, sources.EncodedSource)
  assert isinstance(indexed, sources.TfRecordIndexSource)
  # ArrayRecord is read by random access whatever its size.
  assert isinstance(array_record, sources.TfdsRandomAccessSource)
  # The split spans shards (train[4:23] ends in the third of three).
  assert len(set(indexed.records.positions[:, 0])) > 1
  assert len(indexed) == len(in_memory) == len(array_record) > 0
  order = np.random.default_rng(0).permutation(len(in_memory))  # random access, any order
  raws, labels = in_memory.read(order)
  for other in (indexed, array_record):
    other_raws, other_labels = other.read(order)
    np.testing.assert_array_equal(other_labels, labels)
    assert [bytes(r) for r in other_raws] == [bytes(r) for r in raws]  # the same PNG files
    np.testing.assert_array_equal(other.labels(), in_memory.labels())
  np.testing.assert_array_equal(indexed.decode(indexed.read([0])[0][0]),
                                in_memory.decode(raws[np.argsort(order)[0]]))
  # Worker processes get a pickled copy, which opens the files itself.
  copy = pickle.loads(pickle.dumps(indexed))
  assert [bytes(r) for r in copy.read(order)[0]] == [bytes(r) for r in raws]
  # Each shard's index was cached once, and a second source reuses it.
  cached = sorted(os.listdir(tmp_path / "cache" / "tfrecord_index"))
  assert len(cached) == len(set(indexed.records.paths))
  again = sources.tfds_source(name, data_dirs["tfrecord"], split, in_memory_limit_bytes=0)
  np.testing.assert_array_equal(again.records.positions, indexed.records.positions)
  assert sorted(os.listdir(tmp_path / "cache" / "tfrecord_index")) == cached


def test_large_tfrecord_split_gives_the_same_batches_and_resumes(sharded_tfds, tmp_path,
                                                                  monkeypatch):
  monkeypatch.setenv("TLFLAX_CACHE_DIR", str(tmp_path / "cache"))
  name, data_dirs = sharded_tfds
  config = data_config(source="tfds", name=name, data_dir=data_dirs["tfrecord"],
                       train_split="train", image_size=8, augment="random_resized_crop")
  in_memory = data.build(config, "train", training=True, global_batch_size=6, seed=3)
  monkeypatch.setattr(sources, "TFRECORD_IN_MEMORY_LIMIT_BYTES", 0)
  indexed = data.build(config, "train", training=True, global_batch_size=6, seed=3)
  assert isinstance(in_memory.source, sources.EncodedSource)
  assert isinstance(indexed.source, sources.TfRecordIndexSource)
  assert_batches_equal(all_batches(indexed, epoch=1), all_batches(in_memory, epoch=1))
  assert_batches_equal(all_batches(indexed, epoch=1, start_batch=3),
                       all_batches(in_memory, epoch=1)[3:])


def test_tfrecord_threshold_counts_decoded_pixels_of_fixed_shape_images(digits_dir, tmp_path,
                                                                       monkeypatch):
  monkeypatch.setenv("TLFLAX_CACHE_DIR", str(tmp_path / "cache"))
  # 90 digits of 32x32x3 uint8 decoded: 276480 bytes, whatever the PNGs weigh.
  decoded = 90 * 32 * 32 * 3
  kept = sources.tfds_source("tlflax_digits/source", digits_dir, "test[:50%]",
                             in_memory_limit_bytes=decoded)
  indexed = sources.tfds_source("tlflax_digits/source", digits_dir, "test[:50%]",
                                in_memory_limit_bytes=decoded - 1)
  assert isinstance(kept, sources.ArraySource)
  assert isinstance(indexed, sources.TfRecordIndexSource)
  raws, labels = indexed.read(range(90))
  np.testing.assert_array_equal(labels, kept.labels())
  np.testing.assert_array_equal(np.stack([indexed.decode(r) for r in raws]), kept.pixels)


def test_large_tfrecord_split_with_damaged_files_says_what_to_run(sharded_tfds, tmp_path,
                                                                  monkeypatch):
  import shutil  # pylint: disable=import-outside-toplevel
  from tlflax.data import tfrecord_index  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("TLFLAX_CACHE_DIR", str(tmp_path / "cache"))
  name, data_dirs = sharded_tfds
  copy = tmp_path / "copy"
  shutil.copytree(data_dirs["tfrecord"], copy)
  shard = sorted((copy / name / "1.0.0").glob("*.tfrecord-00001-of-00003"))[0]
  data_bytes = shard.read_bytes()
  shard.write_bytes(data_bytes[:len(data_bytes) // 2])  # cut inside a record
  with pytest.raises(ValueError) as error:
    sources.tfds_source(name, str(copy), "train", in_memory_limit_bytes=0)
  message = str(error.value)
  assert str(shard) in message and f"tfds build {name} --data_dir={copy}" in message
  assert "array_record" in message
  # A remote file system has no pread: the error names the two ways out.
  with pytest.raises(ValueError) as error:
    tfrecord_index.IndexedRecords.from_shards(
        [("gs://bucket/ds/1.0.0/ds-train.tfrecord-00000-of-00001", 0, 5, 5)],
        "tfds build ds --data_dir=gs://bucket")
  message = str(error.value)
  assert "local disk" in message and "tfds build ds --data_dir=gs://bucket" in message
  assert "--file_format=array_record" in message
