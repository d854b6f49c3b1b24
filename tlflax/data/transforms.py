"""Per-example image transforms for training and evaluation, with stateless randomness.

Every random choice (crop position, scale, flip) is drawn from
`stateless_uniform(key, example_ids, ...)`: a counter-based generator, so an
example's augmentation depends only on the key (seed, epoch) and the
example's id, never on which process loads it, in which batch, or whether
the run was resumed half-way through an epoch.

Recipes (`augment`):
  crop_flip            pad 4 pixels with zeros, random crop back, random
                       horizontal flip (the CIFAR recipe).
  random_resized_crop  a random box of 8%-100% of the area with aspect ratio
                       3/4..4/3 resized to the output size, random flip (the
                       ImageNet recipe: torchvision's RandomResizedCrop, whose
                       pixels it gives for the same box).
  none                 the evaluation transform.
Evaluation: resize the shorter side to `resize_size`, cut the centre square.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
from PIL import Image

from tlflax.data import images as image_files

AUGMENTATIONS = ("crop_flip", "random_resized_crop", "none")
CROP_PADDING = 4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10  # tries at a valid box before falling back to a centre crop

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # odd constant that spreads counters over 64 bits


def _mix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser: a bijective uint64 -> uint64 scramble."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _mix64_int(x: int) -> int:
  """`_mix64` on one Python int (no numpy scalar overflow warnings)."""
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


def stateless_uniform(key: Sequence[int], example_ids: np.ndarray, num_draws: int) -> np.ndarray:
  """Uniform [0, 1) numbers that are a pure function of (key, example id, draw number).

  Args:
    key: non-negative ints, e.g. (seed, epoch).
    example_ids: int array (N,).
    num_draws: numbers per example.

  Returns:
    float64 (N, num_draws).

  Examples:
    >>> stateless_uniform((0, 3), np.array([7, 8]), 2).shape
    (2, 2)
  """
  state = 0
  for part in key:
    state = _mix64_int(((state ^ (int(part) & _MASK64)) + _GOLDEN) & _MASK64)
  ids = np.asarray(example_ids, np.int64).astype(np.uint64).reshape(-1, 1)
  draws = np.arange(1, num_draws + 1, dtype=np.uint64).reshape(1, -1)
  with np.errstate(over="ignore"):
    per_example = _mix64(ids * np.uint64(_GOLDEN) + np.uint64(state))
    bits = _mix64(per_example + draws * np.uint64(_GOLDEN))
  # The top 53 bits fill a float64 mantissa exactly.
  return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def num_draws(augment: str) -> int:
  """How many uniform numbers `train_transform` uses per example."""
  if augment == "crop_flip":
    return 3
  if augment == "random_resized_crop":
    return 4 * RRC_ATTEMPTS + 1
  if augment == "none":
    return 0
  raise ValueError(f"Unknown augment {augment!r}; use one of {AUGMENTATIONS}.")


def as_rgb(pixels: np.ndarray) -> np.ndarray:
  """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3).

  Grey is copied into three channels; transparent pixels are composited over
  white, as `images.read_rgb` does for files.
  """
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8:
    raise ValueError(f"Expected uint8 pixels, got {pixels.dtype}.")
  if pixels.ndim == 2:
    pixels = pixels[:, :, None]
  channels = pixels.shape[-1]
  if channels == 3:
    return pixels
  if channels == 1:
    return np.repeat(pixels, 3, axis=2)
  if channels == 4:
    alpha = pixels[:, :, 3:].astype(np.float32) / 255.0
    rgb = pixels[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
  raise ValueError(f"Cannot make RGB from an image of shape {pixels.shape}.")


Pixels = Union[np.ndarray, Image.Image]


def _height_width(pixels: Pixels) -> tuple[int, int]:
  if isinstance(pixels, Image.Image):
    return pixels.height, pixels.width
  return pixels.shape[0], pixels.shape[1]


def _rgb(pixels: Pixels) -> Pixels:
  """An RGB PIL image as it is (decoded files), or `as_rgb` of an array."""
  if isinstance(pixels, Image.Image):
    return image_files.rgb_image(pixels)
  return as_rgb(pixels)


def eval_transform(pixels: Pixels, image_size: int, resize_size: int = 0) -> np.ndarray:
  """Shorter side to `resize_size` (0 = image_size), then the centre square.

  Args:
    pixels: uint8 (H, W, C) of any size, or a PIL image (a decoded file).
    image_size: output side.
    resize_size: shorter side before the crop; >= image_size.

  Returns:
    uint8 (image_size, image_size, 3).
  """
  pixels = _rgb(pixels)
  resize_size = resize_size or image_size
  if _height_width(pixels) == (image_size, image_size) and resize_size == image_size:
    # Already the right size: skip a resize that would only copy.
    return np.asarray(pixels, np.uint8)
  return image_files.resize_and_center_crop(pixels, resize_size, image_size)


def train_transform(pixels: Pixels, uniforms: np.ndarray, augment: str,
                    image_size: int, resize_size: int = 0) -> np.ndarray:
  """One training example's augmentation.

  Args:
    pixels: uint8 (H, W, C) of any size, or a PIL image (a decoded file).
    uniforms: float (num_draws(augment),) from `stateless_uniform`.
    augment: "crop_flip", "random_resized_crop" or "none".
    image_size: output side.
    resize_size: used by "none" and by "crop_flip" on images that are not
      image_size square already (0 = image_size).

  Returns:
    uint8 (image_size, image_size, 3).
  """
  if augment == "none":
    return eval_transform(pixels, image_size, resize_size)
  if augment == "crop_flip":
    # Bring other sizes to image_size first: the recipe assumes CIFAR-sized input.
    base = eval_transform(pixels, image_size, resize_size)
    return _pad_crop_flip(base, uniforms)
  if augment == "random_resized_crop":
    return _random_resized_crop(_rgb(pixels), uniforms, image_size)
  raise ValueError(f"Unknown augment {augment!r}; use one of {AUGMENTATIONS}.")


def _pad_crop_flip(pixels: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
  size = pixels.shape[0]
  span = 2 * CROP_PADDING + 1  # possible offsets per axis
  top = min(int(uniforms[0] * span), span - 1)
  left = min(int(uniforms[1] * span), span - 1)
  padded = np.zeros((size + 2 * CROP_PADDING, pixels.shape[1] + 2 * CROP_PADDING, 3), np.uint8)
  padded[CROP_PADDING:CROP_PADDING + size, CROP_PADDING:CROP_PADDING + pixels.shape[1]] = pixels
  crop = padded[top:top + size, left:left + pixels.shape[1]]
  if uniforms[2] < 0.5:
    crop = crop[:, ::-1]
  return np.ascontiguousarray(crop)


def random_resized_box(height: int, width: int, uniforms: np.ndarray) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box (top, left, box_height, box_width).

  Args:
    height: image height.
    width: image width.
    uniforms: at least 4 * RRC_ATTEMPTS numbers in [0, 1).

  Returns:
    The box; a centre crop with the ratio clamped when no attempt fits.
  """
  area = height * width
  log_low, log_high = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
  for attempt in range(RRC_ATTEMPTS):
    u_scale, u_ratio, u_top, u_left = uniforms[4 * attempt:4 * attempt + 4]
    target_area = area * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * u_scale)
    ratio = math.exp(log_low + (log_high - log_low) * u_ratio)
    box_width = int(round(math.sqrt(target_area * ratio)))
    box_height = int(round(math.sqrt(target_area / ratio)))
    if 0 < box_width <= width and 0 < box_height <= height:
      top = min(int(u_top * (height - box_height + 1)), height - box_height)
      left = min(int(u_left * (width - box_width + 1)), width - box_width)
      return top, left, box_height, box_width
  ratio = width / height
  if ratio < RRC_RATIO[0]:
    box_width, box_height = width, int(round(width / RRC_RATIO[0]))
  elif ratio > RRC_RATIO[1]:
    box_height, box_width = height, int(round(height * RRC_RATIO[1]))
  else:
    box_width, box_height = width, height
  return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def random_resized_flip(uniforms: np.ndarray) -> bool:
  """Whether "random_resized_crop" flips the example drawn with these uniforms."""
  return bool(uniforms[4 * RRC_ATTEMPTS] < 0.5)


def _random_resized_crop(pixels: Pixels, uniforms: np.ndarray, image_size: int) -> np.ndarray:
  height, width = _height_width(pixels)
  top, left, box_height, box_width = random_resized_box(height, width, uniforms)
  image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
  # Crop, then resize, as torchvision's RandomResizedCrop does on PIL images
  # (the same pixels; resizing with PIL's `box=` instead would let the
  # filter read pixels outside the box, and costs the same).
  resized = image.crop((left, top, left + box_width, top + box_height)).resize(
      (image_size, image_size), Image.Resampling.BILINEAR)
  if random_resized_flip(uniforms):
    # In PIL, before the one copy into an array (a tenth of the cost of a
    # reversed-stride copy in numpy).
    resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(resized, np.uint8)
