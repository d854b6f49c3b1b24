"""Images per second of tlflax's input pipeline against tf.data and PyTorch's DataLoader.

    .venv/bin/python benchmarks/input_pipeline.py                 # generated JPEGs (+ hymenoptera)
    .venv/bin/python benchmarks/input_pipeline.py --images 256 --repeats 3   # quicker, noisier

The same files and the same operations for all three: JPEG decode, then the
training transform (224 px random-resized-crop + horizontal flip) or the
evaluation transform (resize the shorter side to 256, centre crop 224), then
normalisation to float32 with the ImageNet mean and std, in batches of 32.

* tlflax: `tlflax.data.build` on an image folder, batches made by Grain
  worker processes (`num_workers`). Its batches leave the host as uint8 and
  are normalised inside the jitted step, on the device, so the host does no
  normalisation here (tf.data and torch do theirs on the host, as their
  usual recipes do; it is the cheapest of the operations).
* tf.data: `tf.io.decode_jpeg` and `tf.image` ops in `Dataset.map` with
  `num_parallel_calls` (AUTOTUNE at all cores), batched and prefetched. Its
  resizes antialias (`antialias=True`) as PIL's do for tlflax and torchvision
  when they shrink; the last column is tf.data with TF's default
  `antialias=False`, a cheaper operation that gives other pixels (aliased
  where it shrinks), for reference.
* PyTorch: a `DataLoader` over an image-folder dataset with torchvision's
  `RandomResizedCrop`/`RandomHorizontalFlip` or `Resize`/`CenterCrop` on PIL
  images, then `ToTensor` and `Normalize` (worker processes).
* DALI (CPU): tlflax with `data.engine="dali_cpu"`, the same batches (crop
  boxes, sizes, flips) made by NVIDIA DALI's graph on `workers` threads;
  when `nvidia-dali-cuda120` is installed. On a GPU host, engine "dali"
  runs the graph on the GPU.

Each at 1 worker and at every core of the host. The data: a folder of JPEGs
generated at ImageNet-like sizes (about 500x375, quality 90; runs on a fresh
clone), and `../shared/data/hymenoptera` (real photos) when present. Every
number is the median over `--repeats` passes over the folder after one
warm-up pass; the table's ratios compare loaders measured in the same run.
On a shared machine one such number moves by 10-20% between runs, so the
scaling of tlflax from 1 worker to every core is measured again at the end,
the two settings alternating over `--scaling-rounds` rounds: the median
ratio and its range.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

# torchvision crashes when imported after TensorFlow: import it first.
import torch
import torch.utils.data
import torchvision
from torchvision import transforms as tv

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tlflax import data, defaults  # pylint: disable=wrong-import-position
from tlflax.data import tensorflow_setup  # pylint: disable=wrong-import-position
from tlflax.data.images import ImageError  # pylint: disable=wrong-import-position

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 32
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                      "hymenoptera", "train")


def generate_jpegs(root: str, count: int, seed: int = 0) -> str:
  """`count` JPEGs of about 500x375 (both orientations), quality 90, in two class folders."""
  rng = np.random.default_rng(seed)
  for index in range(count):
    folder = os.path.join(root, f"class{index % 2}")
    os.makedirs(folder, exist_ok=True)
    width, height = (500, 375) if index % 3 else (375, 500)
    # Smooth structure plus noise: compresses like a photo, not like flat colour.
    y, x = np.mgrid[0:height, 0:width]
    base = (np.sin(x / rng.uniform(8, 40)) + np.cos(y / rng.uniform(8, 40))) * 60 + 128
    pixels = base[..., None] + rng.normal(0, 20, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f"{index:05d}.jpg"), quality=90)
  return root


def image_paths(root: str) -> list[str]:
  return sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                if f.lower().endswith((".jpg", ".jpeg")))


def time_passes(one_pass, repeats: int) -> float:
  """Median seconds of `one_pass()` over `repeats`, after one warm-up pass."""
  return timed_passes(one_pass, repeats)[0]


def timed_passes(one_pass, repeats: int) -> tuple[float, float | None]:
  """`time_passes`, and the cores this process and its children used meanwhile.

  The cores are CPU seconds over wall seconds of the timed passes (None
  without psutil).
  """
  one_pass()
  try:
    import psutil  # pylint: disable=import-outside-toplevel
    tree = [psutil.Process()] + psutil.Process().children(recursive=True)
  except ImportError:
    tree = []

  def cpu_seconds():
    total = 0.0
    for process in tree:
      try:
        used = process.cpu_times()
        total += used.user + used.system
      except psutil.NoSuchProcess:
        pass
    return total

  times = []
  cpu_start, wall_start = cpu_seconds(), time.perf_counter()
  for _ in range(repeats):
    start = time.perf_counter()
    one_pass()
    times.append(time.perf_counter() - start)
  cores = (cpu_seconds() - cpu_start) / (time.perf_counter() - wall_start) if tree else None
  return statistics.median(times), cores


def tlflax_pass(root: str, training: bool, workers: int, engine: str = "pil"):
  config = defaults.base_config().data
  config.source, config.path = "folder", root
  config.train_split = config.eval_split = "."
  config.image_size, config.resize_size = 224, 256
  config.augment = "random_resized_crop"
  config.mean, config.std = MEAN, STD
  config.engine = engine
  # "pil": `workers` Grain worker processes, one thread each, as a training
  # run uses them: one stream of batches over all its epochs (so, like the
  # DataLoader's persistent workers, they start once, in the warm-up pass).
  # "dali_cpu": DALI with `workers` threads.
  dataset = data.build(config, split="train" if training else "eval", training=training,
                       global_batch_size=BATCH,
                       num_threads=1 if engine == "pil" else workers, num_workers=workers)
  stream = iter(dataset.stream(0, dataset.steps_per_epoch * 1_000_000))

  def one_pass():
    for _ in range(dataset.steps_per_epoch):
      next(stream)["image"].shape  # pylint: disable=expression-not-assigned

  one_pass.close = stream.close  # stops the workers, so they take no CPU from what follows
  return one_pass, dataset.steps_per_epoch * BATCH


def tf_pass(paths: list[str], training: bool, workers: int, antialias: bool = True):
  tf = tensorflow_setup.import_tensorflow()
  mean, std = tf.constant(MEAN), tf.constant(STD)

  def train_map(path):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    # torchvision's RandomResizedCrop box: scale (0.08, 1), ratio (3/4, 4/3).
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), tf.zeros((1, 0, 4)), area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, size)
    image = tf.image.resize(image, (224, 224), method="bilinear", antialias=antialias)
    image = tf.image.random_flip_left_right(image)
    return (image / 255.0 - mean) / std

  def eval_map(path):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = 256.0 / tf.reduce_min(shape)
    image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32),
                            method="bilinear", antialias=antialias)
    image = tf.image.resize_with_crop_or_pad(image, 224, 224)
    return (image / 255.0 - mean) / std

  options = tf.data.Options()
  options.threading.private_threadpool_size = workers
  dataset = (tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths), seed=0)
             .map(train_map if training else eval_map,
                  num_parallel_calls=tf.data.AUTOTUNE if workers > 1 else 1)
             .batch(BATCH, drop_remainder=training).prefetch(tf.data.AUTOTUNE)
             .with_options(options))

  def one_pass():
    for batch in dataset:
      batch.numpy()

  count = (len(paths) // BATCH) * BATCH if training else len(paths)
  return one_pass, count


class TorchFolder(torch.utils.data.Dataset):
  """Image files -> transformed tensors (what torchvision's ImageFolder does, on a path list)."""

  def __init__(self, paths, transform):
    self.paths, self.transform = paths, transform

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    with Image.open(self.paths[index]) as image:
      return self.transform(image.convert("RGB")), 0


def torch_pass(paths: list[str], training: bool, workers: int):
  steps = ([tv.RandomResizedCrop(224), tv.RandomHorizontalFlip()] if training
           else [tv.Resize(256), tv.CenterCrop(224)])
  transform = tv.Compose([*steps, tv.ToTensor(), tv.Normalize(MEAN, STD)])
  loader = torch.utils.data.DataLoader(TorchFolder(paths, transform), batch_size=BATCH,
                                       shuffle=training, drop_last=training,
                                       num_workers=workers, persistent_workers=True)

  def one_pass():
    for images, _ in loader:
      images.numpy()

  count = (len(paths) // BATCH) * BATCH if training else len(paths)
  return one_pass, count


def dali_installed() -> bool:
  """Whether NVIDIA DALI is there for the "DALI (CPU)" column (tlflax's data.engine="dali_cpu")."""
  return importlib.util.find_spec("nvidia.dali") is not None


def measure(root: str, repeats: int, cores: int) -> list[dict]:
  paths = image_paths(root)
  rows = []
  for training in (True, False):
    for workers in sorted({1, cores}):
      row = {"transform": "train" if training else "eval", "workers": workers}
      for name, make in (("tlflax", lambda: tlflax_pass(root, training, workers)),
                         ("tf.data", lambda: tf_pass(paths, training, workers)),
                         ("torch", lambda: torch_pass(paths, training, workers)),
                         ("tf.data, no antialias",
                          lambda: tf_pass(paths, training, workers, antialias=False)),
                         *((("DALI (CPU)",
                             lambda: tlflax_pass(root, training, workers, "dali_cpu")),)
                           if dali_installed() else ())):
        try:
          one_pass, count = make()
        except ImageError as e:  # DALI takes JPEGs only; the folder holds another image
          print(f"  {name}: not measured: {e}")
          row[name] = None
          continue
        row[name] = count / time_passes(one_pass, repeats)
        getattr(one_pass, "close", lambda: None)()
      rows.append(row)
      print(f"  {row['transform']:5} {workers} worker(s): " + ", ".join(
          f"{k} {v:.0f}/s" for k, v in row.items()
          if k not in ("transform", "workers") and v is not None),
            flush=True)
  return rows


def scaling(root: str, repeats: int, cores: int, rounds: int
            ) -> tuple[dict[str, list[float]], dict[tuple[str, int], list[float]]]:
  """tlflax's images/s at all cores over 1 worker, measured `rounds` times in turn.

  One pair of numbers moves by 15% from run to run on a shared machine;
  alternating the two settings and taking the median of the ratios gives a
  figure that a slow minute of the host cannot make or break.

  Returns:
    The ratios per transform, and the cores tlflax's processes used per
    (transform, workers) in each round.
  """
  ratios: dict[str, list[float]] = {}
  used: dict[tuple[str, int], list[float]] = {}
  for training in (True, False):
    transform = "train" if training else "eval"
    for _ in range(rounds):
      rates = {}
      for workers in (1, cores):
        one_pass, count = tlflax_pass(root, training, workers)
        seconds, busy = timed_passes(one_pass, repeats)
        rates[workers] = count / seconds
        if busy is not None:
          used.setdefault((transform, workers), []).append(busy)
        one_pass.close()
      ratios.setdefault(transform, []).append(rates[cores] / rates[1])
  return ratios, used


def table(title: str, rows: list[dict]) -> str:
  lines = [f"\n{title}", "| transform | workers | tlflax (img/s) | tf.data | torch DataLoader "
           "| tlflax / tf.data | tlflax / torch | tf.data, no antialias | DALI (CPU) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    dali = ("not installed" if "DALI (CPU)" not in row else
            "- (not JPEGs only)" if row["DALI (CPU)"] is None else f"{row['DALI (CPU)']:.0f}")
    lines.append(f"| {row['transform']} | {row['workers']} | {row['tlflax']:.0f} | "
                 f"{row['tf.data']:.0f} | {row['torch']:.0f} | "
                 f"{row['tlflax'] / row['tf.data']:.2f} | {row['tlflax'] / row['torch']:.2f} | "
                 f"{row['tf.data, no antialias']:.0f} | {dali} |")
  by_workers = {(r["transform"], r["workers"]): r["tlflax"] for r in rows}
  for transform in ("train", "eval"):
    counts = sorted(w for t, w in by_workers if t == transform)
    if len(counts) > 1:
      lines.append(f"tlflax {transform}: {counts[-1]} workers / 1 worker = "
                   f"{by_workers[(transform, counts[-1])] / by_workers[(transform, 1)]:.2f}x")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=512, help="generated JPEGs")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--scaling-rounds", type=int, default=5,
                      help="alternating 1-worker / all-core measurements of tlflax (0: none)")
  parser.add_argument("--no-shared", action="store_true", help="skip ../shared/data/hymenoptera")
  args = parser.parse_args(argv)
  cores = os.cpu_count() or 1
  torch.set_num_threads(1)  # the DataLoader's workers are the parallelism measured
  print(f"{cores} cores; torch {torch.__version__}, torchvision {torchvision.__version__}")
  results = []
  with tempfile.TemporaryDirectory() as scratch:
    root = generate_jpegs(os.path.join(scratch, "jpegs"), args.images)
    print(f"Generated {args.images} JPEGs (about 500x375, quality 90):")
    results.append((f"Generated JPEGs ({args.images}, about 500x375, q90)",
                    measure(root, args.repeats, cores)))
    ratios, used = (scaling(root, args.repeats, cores, args.scaling_rounds) if cores > 1
                    else ({}, {}))
    if os.path.isdir(SHARED) and not args.no_shared:
      print(f"{SHARED}:")
      results.append((f"hymenoptera train ({len(image_paths(SHARED))} photos)",
                      measure(SHARED, args.repeats, cores)))
  for title, rows in results:
    print(table(title, rows))
  for transform, values in ratios.items():
    if values:
      print(f"tlflax {transform}, generated JPEGs: {cores} workers / 1 worker over "
            f"{len(values)} alternating rounds: median {statistics.median(values):.2f}x "
            f"(min {min(values):.2f}, max {max(values):.2f})")
  for (transform, workers), values in used.items():
    print(f"tlflax {transform}, {workers} worker(s): the main process and its workers used "
          f"{statistics.median(values):.2f} cores (median of {len(values)} rounds)")
  return results, ratios


if __name__ == "__main__":
  main()
