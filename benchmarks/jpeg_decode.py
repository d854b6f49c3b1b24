"""Images/s of the ways to decode a JPEG for a 224 px crop, on one thread, and what each changes.

    .venv/bin/python benchmarks/jpeg_decode.py                 # generated JPEGs (+ hymenoptera)
    .venv/bin/python benchmarks/jpeg_decode.py --images 128 --repeats 5

Each way decodes the file's bytes (already in memory: disk reads are not
measured) and then applies the evaluation transform (shorter side to 256,
centre crop 224: `tlflax.data.images.resize_and_center_crop`) or the
training transform (torchvision's random-resized-crop box, scale (0.08, 1),
resized bilinearly to 224), on one thread:

* PIL full: `Image.open(...).convert("RGB")`, the reference.
* PIL draft: `Image.draft("RGB", size)` first, so libjpeg decodes at 1/2, 1/4
  or 1/8 of the size in the DCT itself. The size asked for is the smallest
  that leaves the transform at least as many pixels as it outputs: a shorter
  side of 256 for evaluation; for training, the random box (known before
  decoding: it depends only on the seed, the example and the image's size)
  at least 224 px on each side. So a reduction never makes the transform
  upsample what it would not have upsampled.
* simplejpeg: `decode_jpeg(..., min_height=, min_width=)` with the same
  minimum; libjpeg-turbo then also uses the scales 7/8, 3/4, 5/8, 3/8.
* tf.io.decode_jpeg: `ratio=` 1, 2, 4 or 8, the same reduction as PIL's draft
  (eager, one call per image; TensorFlow's own IDCT and upsampling).
* torchvision.io.decode_jpeg: full size (it has no reduced-size decoding;
  torchvision 0.29 deprecates its image decoders in favour of TorchCodec).

The table gives images/s, the ratio to PIL full measured in the same run,
the mean share of pixels actually decoded, and how far the final 224x224
evaluation crop is from PIL full's (max and mean absolute difference over
its uint8 values). EXIF orientation is not applied by any of them here.
Every number is the median over `--repeats` rounds after one warm-up round;
each round runs every decoder once, in turn. The data: JPEGs generated at
ImageNet-like sizes (about 500x375, quality 90; runs on a fresh clone), the
same at a camera's 1600x1200, and `../shared/data/hymenoptera` (real photos)
when present.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

# torchvision crashes when imported after TensorFlow: import it first.
import torch
import torchvision
import torchvision.io

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tlflax.data import images as image_files  # pylint: disable=wrong-import-position
from tlflax.data import tensorflow_setup  # pylint: disable=wrong-import-position
from tlflax.data import transforms  # pylint: disable=wrong-import-position

CROP, RESIZE = 224, 256
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                      "hymenoptera", "train")
PIL_FACTORS = (8, 4, 2, 1)  # the reductions libjpeg offers PIL's draft and TF's ratio


def generate_jpegs(root: str, count: int, size: tuple[int, int] = (500, 375),
                   seed: int = 0) -> str:
  """`count` JPEGs of `size` (width, height; every third one turned upright), quality 90."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  for index in range(count):
    width, height = size if index % 3 else size[::-1]
    # Smooth structure plus noise: compresses like a photo, not like flat colour.
    y, x = np.mgrid[0:height, 0:width]
    base = (np.sin(x / rng.uniform(8, 40)) + np.cos(y / rng.uniform(8, 40))) * 60 + 128
    pixels = base[..., None] + rng.normal(0, 20, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(root, f"{index:05d}.jpg"), quality=90)
  return root


def read_jpegs(root: str) -> list[bytes]:
  """The bytes of every JPEG under `root` (other files, e.g. a GIF, are left out)."""
  paths = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                 if f.lower().endswith((".jpg", ".jpeg")))
  contents = []
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      if image.format == "JPEG":  # some ".jpg" files are PNGs or GIFs in disguise
        contents.append(data)
  return contents


# ---------------------------------------------------------------- what each crop needs


def eval_minimum(width: int, height: int) -> tuple[int, int]:
  """Smallest decoded (width, height) whose shorter side still reaches RESIZE (or all of it)."""
  scale = min(1.0, RESIZE / min(width, height))
  return math.ceil(width * scale), math.ceil(height * scale)


def train_minimum(width: int, height: int, box: tuple[int, int, int, int]) -> tuple[int, int]:
  """Smallest decoded (width, height) that leaves the box at least CROP px on each side."""
  _, _, box_height, box_width = box
  return (min(width, math.ceil(width * CROP / box_width)),
          min(height, math.ceil(height * CROP / box_height)))


def largest_factor(width: int, height: int, minimum: tuple[int, int]) -> int:
  """The largest of 8, 4, 2, 1 whose reduced size (libjpeg rounds up) is still >= minimum."""
  return next(f for f in PIL_FACTORS
              if math.ceil(width / f) >= minimum[0] and math.ceil(height / f) >= minimum[1])


# ---------------------------------------------------------------- the decoders


def pil_full(data: bytes, width: int, height: int, minimum) -> np.ndarray:
  del width, height, minimum
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def pil_draft(data: bytes, width: int, height: int, minimum) -> np.ndarray:
  del width, height
  with Image.open(io.BytesIO(data)) as image:
    image.draft("RGB", minimum)  # the largest reduction that stays >= minimum
    return np.asarray(image.convert("RGB"))


def simplejpeg_min(data: bytes, width: int, height: int, minimum) -> np.ndarray:
  import simplejpeg  # pylint: disable=import-outside-toplevel
  del width, height
  return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=minimum[0],
                                min_height=minimum[1])


def tf_ratio(data: bytes, width: int, height: int, minimum) -> np.ndarray:
  tf = tensorflow_setup.import_tensorflow()
  return tf.io.decode_jpeg(data, channels=3,
                           ratio=largest_factor(width, height, minimum)).numpy()


def torchvision_full(data: bytes, width: int, height: int, minimum) -> np.ndarray:
  del width, height, minimum
  encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
  decoded = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB)
  return decoded.permute(1, 2, 0).numpy()


DECODERS: dict[str, Callable] = {
    "PIL full": pil_full,
    "PIL draft": pil_draft,
    "simplejpeg min size": simplejpeg_min,
    "tf.io.decode_jpeg ratio": tf_ratio,
    "torchvision.io.decode_jpeg": torchvision_full,
}


# ---------------------------------------------------------------- the transforms


def eval_crop(pixels: np.ndarray) -> np.ndarray:
  return image_files.resize_and_center_crop(pixels, RESIZE, CROP)


def train_crop(pixels: np.ndarray, width: int, height: int,
               box: tuple[int, int, int, int]) -> np.ndarray:
  """The full-size box, scaled to the decoded size, resized to CROP x CROP."""
  top, left, box_height, box_width = box
  scale_x, scale_y = pixels.shape[1] / width, pixels.shape[0] / height
  return np.asarray(Image.fromarray(pixels).resize(
      (CROP, CROP), Image.Resampling.BILINEAR,
      box=(left * scale_x, top * scale_y, (left + box_width) * scale_x,
           (top + box_height) * scale_y)))


def image_sizes(contents: list[bytes]) -> list[tuple[int, int]]:
  sizes = []
  for data in contents:
    with Image.open(io.BytesIO(data)) as image:
      sizes.append(image.size)
  return sizes


def training_boxes(sizes: list[tuple[int, int]], seed: int = 0) -> list[tuple[int, int, int, int]]:
  """The pipeline's random-resized-crop box of each image (keyed by seed and example)."""
  uniforms = transforms.stateless_uniform(
      (seed, 0), np.arange(len(sizes)), transforms.num_draws("random_resized_crop"))
  return [transforms.random_resized_box(height, width, u)
          for (width, height), u in zip(sizes, uniforms)]


def time_round_robin(passes: dict[str, Callable], repeats: int) -> dict[str, float]:
  """Median seconds of each pass over `repeats` rounds, after one warm-up round.

  Every round runs each pass once, in turn, so a change in the machine's load
  during the run reaches all of them alike and their ratios stay fair.
  """
  for one_pass in passes.values():
    one_pass()
  times = {name: [] for name in passes}
  for _ in range(repeats):
    for name, one_pass in passes.items():
      start = time.perf_counter()
      one_pass()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(seconds) for name, seconds in times.items()}


def measure(contents: list[bytes], repeats: int) -> list[dict]:
  """One row per decoder: img/s for each transform, pixels decoded, eval-crop difference."""
  sizes = image_sizes(contents)
  boxes = training_boxes(sizes)
  eval_minima = [eval_minimum(w, h) for w, h in sizes]
  train_minima = [train_minimum(w, h, box) for (w, h), box in zip(sizes, boxes)]
  reference = [eval_crop(pil_full(data, w, h, None)) for data, (w, h) in zip(contents, sizes)]

  def eval_pass(decode):
    return [eval_crop(decode(data, w, h, minimum))
            for data, (w, h), minimum in zip(contents, sizes, eval_minima)]

  def train_pass(decode):
    return [train_crop(decode(data, w, h, minimum), w, h, box)
            for data, (w, h), minimum, box in zip(contents, sizes, train_minima, boxes)]

  passes = {}
  for name, decode in DECODERS.items():
    passes[(name, "eval")] = lambda decode=decode: eval_pass(decode)
    passes[(name, "train")] = lambda decode=decode: train_pass(decode)
  seconds = time_round_robin(passes, repeats)
  rows = []
  for name, decode in DECODERS.items():
    row = {"decoder": name, "eval": len(contents) / seconds[(name, "eval")],
           "train": len(contents) / seconds[(name, "train")]}
    for transform, minima in (("eval", eval_minima), ("train", train_minima)):
      decoded = [decode(data, w, h, m).shape for data, (w, h), m in zip(contents, sizes, minima)]
      row[f"{transform} pixels"] = float(np.mean([(s[0] * s[1]) / (w * h)
                                                  for s, (w, h) in zip(decoded, sizes)]))
    differences = [np.abs(crop.astype(np.int16) - ref.astype(np.int16))
                   for crop, ref in zip(eval_pass(decode), reference)]
    row["max diff"] = int(max(d.max() for d in differences))
    row["mean diff"] = float(np.mean([d.mean() for d in differences]))
    rows.append(row)
    print(f"  {name}: eval {row['eval']:.0f}/s, train {row['train']:.0f}/s", flush=True)
  return rows


def table(title: str, rows: list[dict]) -> str:
  reference = rows[0]
  lines = [f"\n{title}",
           "| decoder | eval (img/s) | vs PIL full | pixels decoded | train (img/s) | vs PIL full "
           "| pixels decoded | eval crop max abs diff | mean abs diff |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(
        f"| {row['decoder']} | {row['eval']:.0f} | {row['eval'] / reference['eval']:.2f} | "
        f"{row['eval pixels']:.0%} | {row['train']:.0f} | "
        f"{row['train'] / reference['train']:.2f} | {row['train pixels']:.0%} | "
        f"{row['max diff']} | {row['mean diff']:.3f} |")
  return "\n".join(lines)


def single_threaded() -> None:
  """One thread for every library, so each number is one core's decoding speed."""
  torch.set_num_threads(1)
  tf = tensorflow_setup.import_tensorflow()
  try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
  except RuntimeError:  # already initialised by an earlier caller in this process
    pass


def parse_size(text: str) -> tuple[int, int]:
  """"500x375" -> (500, 375)."""
  try:
    width, height = (int(part) for part in text.lower().split("x"))
  except ValueError as error:
    raise SystemExit(f"Cannot read size {text!r}: write WIDTHxHEIGHT, e.g. 500x375.") from error
  return width, height


def main(argv=None) -> list[tuple[str, list[dict]]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=64, help="generated ImageNet-sized JPEGs")
  parser.add_argument("--size", default="500x375", help="their width x height")
  parser.add_argument("--large-images", type=int, default=16,
                      help="generated camera-sized JPEGs (0 = none)")
  parser.add_argument("--large-size", default="1600x1200", help="their width x height")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-shared", action="store_true", help="skip ../shared/data")
  args = parser.parse_args(argv)
  import simplejpeg  # pylint: disable=import-outside-toplevel
  single_threaded()
  tf = tensorflow_setup.import_tensorflow()
  print(f"One thread; Pillow {Image.__version__}, simplejpeg {simplejpeg.__version__}, "
        f"TensorFlow {tf.__version__}, torchvision {torchvision.__version__}")
  results = []
  with tempfile.TemporaryDirectory() as scratch:
    size, large_size = parse_size(args.size), parse_size(args.large_size)
    sets = [(f"Generated JPEGs ({args.images}, {args.size}, q90)",
             generate_jpegs(os.path.join(scratch, "imagenet_sized"), args.images, size))]
    if args.large_images:
      sets.append((f"Generated JPEGs ({args.large_images}, {args.large_size}, q90)",
                   generate_jpegs(os.path.join(scratch, "large"), args.large_images,
                                  large_size, seed=1)))
    if os.path.isdir(SHARED) and not args.no_shared:
      sets.append(("hymenoptera train (real photos)", SHARED))
    for title, root in sets:
      contents = read_jpegs(root)
      print(f"{title}: {len(contents)} JPEGs")
      results.append((title, measure(contents, args.repeats)))
  for title, rows in results:
    print(table(title, rows))
  return results


if __name__ == "__main__":
  main()
