"""data.engine="dali_cpu": NVIDIA DALI's graph makes the batches tlflax's pipeline plans."""

import os
import sys

import numpy as np
from PIL import Image
import pytest

from tlflax import data, defaults
from tlflax.data import images as images_lib


def write_jpegs(root, count=(12, 6)):
  """Noisy JPEGs of several sizes in train/ and val/, one with an EXIF rotation."""
  rng = np.random.default_rng(0)
  sizes = [(60, 45), (45, 60), (70, 70), (33, 50)]
  for split, number in zip(("train", "val"), count):
    for i in range(number):
      folder = root / split / f"class{i % 2}"
      folder.mkdir(parents=True, exist_ok=True)
      width, height = sizes[i % len(sizes)]
      y, x = np.mgrid[0:height, 0:width]
      pixels = (np.sin(x / 5.0)[..., None] * 60 + np.cos(y / 7.0)[..., None] * 60 + 128
                + rng.normal(0, 25, (height, width, 3)))
      image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
      if i == 1:
        image = image.convert("L")  # greyscale JPEG
      exif = Image.Exif()
      if i == 3:
        exif[0x0112] = 6  # shown turned by 90 degrees (a 33x50 file shown as 50x33)
      image.save(folder / f"{i}.jpg", quality=90, exif=exif)
  return root


def config(root, engine, augment="random_resized_crop"):
  data_config = defaults.base_config().data
  data_config.source, data_config.path = "folder", str(root)
  data_config.train_split, data_config.eval_split = "train", "val"
  data_config.image_size, data_config.resize_size = 32, 36
  data_config.augment, data_config.engine = augment, engine
  return data_config


def both_engines(root, training, **kwargs):
  split = "train" if training else "eval"
  pil = data.build(config(root, "pil"), split, training=training, num_workers=0, **kwargs)
  dali = data.build(config(root, "dali_cpu"), split, training=training, **kwargs)
  return pil, dali


@pytest.mark.parametrize("training", [True, False])
def test_dali_makes_pils_batches_up_to_resampling_rounding(tmp_path, training):
  """The same rows, labels, masks, boxes, sizes and flips as the PIL engine.

  The pixels may differ by one level of 255 inside the image: both resample
  with the same antialiased triangle filter, PIL in fixed point with an 8-bit
  intermediate between its two passes, DALI in floating point, so one
  rounding step apart. A box, size or flip off by even one pixel moves these
  noisy images by tens of levels. At the outermost two rows and columns the
  two libraries weigh the pixels beyond the edge differently, so the border
  is only bounded on average.
  """
  pytest.importorskip("nvidia.dali")
  root = write_jpegs(tmp_path)
  pil, dali = both_engines(root, training, global_batch_size=4, seed=3)
  assert type(dali).__name__ == "DaliDataset" and dali.steps_per_epoch == pil.steps_per_epoch
  steps = 2 * pil.steps_per_epoch  # two epochs: two shuffles, two draws of boxes and flips
  for mine, theirs in zip(dali.stream(0, steps), pil.stream(0, steps)):
    assert list(mine) == list(theirs)
    assert mine["image"].dtype == np.uint8 and mine["image"].shape == theirs["image"].shape
    np.testing.assert_array_equal(mine["label"], theirs["label"])
    if not training:
      np.testing.assert_array_equal(mine["mask"], theirs["mask"])
    difference = np.abs(mine["image"].astype(int) - theirs["image"].astype(int))
    assert difference[:, 2:-2, 2:-2].max() <= 1
    assert difference.mean() < 0.5
  if not training:  # 6 images in batches of 4: the second batch is half padding
    assert not mine["image"][2:].any() and mine["mask"].tolist() == [1, 1, 0, 0]


def test_dali_batches_resume_and_shard_exactly(tmp_path):
  """Each batch is a function of (seed, epoch, step): resuming and sharding change none."""
  pytest.importorskip("nvidia.dali")
  root = write_jpegs(tmp_path)
  whole = data.build(config(root, "dali_cpu"), "train", training=True, global_batch_size=4,
                     seed=1)
  expected = list(whole.stream(0, 6))
  resumed = list(whole.stream(4, 6))
  for mine, theirs in zip(resumed, expected[4:]):
    np.testing.assert_array_equal(mine["image"], theirs["image"])
  one = whole.batch(epoch=1, step=1)  # step 4 = epoch 1, batch 1 (3 batches an epoch)
  np.testing.assert_array_equal(one["image"], expected[4]["image"])
  halves = [data.build(config(root, "dali_cpu"), "train", training=True, global_batch_size=4,
                       seed=1, process_index=index, process_count=2) for index in (0, 1)]
  for step in (0, 4):
    parts = [list(half.stream(step, step + 1))[0] for half in halves]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]),
                                  expected[step]["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]),
                                  expected[step]["label"])


def test_dali_evaluation_split_over_processes_is_the_whole_batch(tmp_path):
  """6 images in a global batch of 16 on 2 processes: the second process's
  rows are all padding, and the parts still make the one-process batch."""
  pytest.importorskip("nvidia.dali")
  root = write_jpegs(tmp_path)
  build = lambda **kwargs: data.build(config(root, "dali_cpu"), "eval", training=False,
                                      global_batch_size=16, **kwargs)
  (whole,) = list(build().stream(0, 1))
  parts = [list(build(process_index=index, process_count=2).stream(0, 1))[0]
           for index in (0, 1)]
  assert parts[1]["mask"].tolist() == [0] * 8 and not parts[1]["image"].any()
  for key in ("image", "label", "mask"):
    np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])
  assert whole["mask"].tolist() == [1] * 6 + [0] * 10


def test_dali_refuses_what_it_would_decode_otherwise(tmp_path):
  pytest.importorskip("nvidia.dali")
  root = write_jpegs(tmp_path)
  Image.new("RGBA", (20, 20)).save(root / "train" / "class0" / "clear.png")
  with pytest.raises(images_lib.ImageError, match=r"clear\.png is a PNG image in mode RGBA.*"
                                                  r"data\.engine='pil'"):
    data.build(config(root, "dali_cpu"), "train", training=True, global_batch_size=4)
  os.remove(root / "train" / "class0" / "clear.png")
  with pytest.raises(ValueError, match="supports data.augment in"):
    data.build(config(root, "dali_cpu", augment="crop_flip"), "train", training=True,
               global_batch_size=4)
  with pytest.raises(ValueError, match="Unknown data.engine 'dal'"):
    data.build(config(root, "dal"), "train", training=True, global_batch_size=4)
  from nvidia.dali import backend  # pylint: disable=import-outside-toplevel
  if backend.GetCUDADeviceCount() == 0:
    with pytest.raises(ValueError, match="DALI sees none on this host.*'dali_cpu'"):
      data.build(config(root, "dali"), "train", training=True, global_batch_size=4)


def test_without_dali_the_error_says_how_to_install_it(tmp_path, monkeypatch):
  root = write_jpegs(tmp_path)
  monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails as if not installed
  with pytest.raises(ImportError, match="pip install nvidia-dali-cuda120"):
    data.build(config(root, "dali_cpu"), "train", training=True, global_batch_size=4)


def test_a_training_run_reads_its_batches_through_dali(tmp_path, monkeypatch):
  """The training loop, evaluation and checkpoints take DALI's batches as they take PIL's."""
  pytest.importorskip("nvidia.dali")
  from tlflax import training  # pylint: disable=import-outside-toplevel
  from tlflax.data import dali_engine  # pylint: disable=import-outside-toplevel
  from tlflax.training import metrics  # pylint: disable=import-outside-toplevel
  root = write_jpegs(tmp_path / "images", count=(16, 8))
  run_config = defaults.base_config()
  run_config.data = config(root, "dali_cpu")
  run_config.batch_size = run_config.eval_batch_size = 8
  run_config.num_train_steps, run_config.log_every_steps = 4, 1
  planned = []
  original = dali_engine.DaliDataset._plan

  def spy(self, step):
    planned.append((self.training, step))
    return original(self, step)

  monkeypatch.setattr(dali_engine.DaliDataset, "_plan", spy)
  result = training.train_and_evaluate(run_config, str(tmp_path / "run"))
  assert np.isfinite(result["eval/loss"])
  # 2 batches an epoch: steps 0-3 of training, and each evaluation's one batch.
  assert [step for is_training, step in planned if is_training] == [0, 1, 2, 3]
  assert any(not is_training for is_training, _ in planned)
  lines = metrics.read_metrics(str(tmp_path / "run"))
  assert {line["split"] for line in lines} == {"train", "eval"}
