"""Image files -> the NHWC float32 batches a pretrained model expects.

Every pretrained model was trained on images prepared in one particular way,
and it only gives its published accuracy on images prepared the same way.
`Preprocessing` records that way; `preprocess` applies it:

1. read the file as 8-bit RGB (greyscale, palette, RGBA, CMYK, 16-bit ... too);
2. resize so the shorter side is `resize_size`, then cut the centre
   `crop_size` x `crop_size` square (torchvision's `Resize` + `CenterCrop`);
3. scale the pixels to [0, `value_range`], reorder the channels, and
   normalise with `mean` and `std`.

The three conventions in use:

    torch  (torchvision, timm): [0, 1], RGB, ImageNet mean/std
    caffe  (Keras ResNet v1, VGG): [0, 255], BGR, minus the ImageNet mean pixel
    tf     (Keras ResNet v2): [-1, 1], RGB

    >>> batch = preprocess(["cat.jpg", "dog.png"], TORCH)   # (2, 224, 224, 3)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

# ImageNet channel statistics of torchvision/timm, on [0, 1] RGB pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The ImageNet mean pixel of the original Caffe models, on [0, 255] BGR pixels
# (keras.applications.imagenet_utils, mode="caffe").
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How images are prepared for one set of pretrained weights.

  Attributes:
    crop_size: side of the square the model sees.
    resize_size: the shorter side is resized to this before the centre crop.
    interpolation: "bilinear", "bicubic", "nearest" or "lanczos" (PIL's,
      which smooths when shrinking, like torchvision on PIL images).
    value_range: pixels are scaled to [0, value_range] first: 1.0 or 255.0.
    channel_order: "RGB" or "BGR" (Caffe-trained weights).
    mean, std: per channel, in `channel_order` and on the `value_range` scale;
      the result is `(pixels - mean) / std`.

  Examples:
    >>> Preprocessing(crop_size=288, resize_size=288, interpolation="bicubic")
  """
  crop_size: int = 224
  resize_size: int = 256
  interpolation: str = "bilinear"
  value_range: float = 1.0
  channel_order: str = "RGB"
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    # Tuples even when read back from JSON lists, so instances compare equal.
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))
    if self.interpolation not in _INTERPOLATIONS:
      raise ValueError(f"Unknown interpolation {self.interpolation!r}; use one of "
                       f"{sorted(_INTERPOLATIONS)}.")
    if self.channel_order not in ("RGB", "BGR"):
      raise ValueError(f"channel_order must be 'RGB' or 'BGR', not {self.channel_order!r}.")
    if not 0 < self.crop_size <= self.resize_size:
      raise ValueError(f"Need 0 < crop_size <= resize_size, got crop_size={self.crop_size}, "
                       f"resize_size={self.resize_size}.")
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f"mean and std need three values (std > 0): {self.mean}, {self.std}.")

  def to_dict(self) -> dict:
    """A JSON-ready dict; `Preprocessing(**d)` reads it back."""
    return dataclasses.asdict(self)

  def with_crop_size(self, crop_size: int) -> "Preprocessing":
    """The same recipe at another size, keeping the resize/crop ratio.

    Examples:
      >>> TORCH.with_crop_size(112).resize_size
      128
    """
    resize_size = int(round(crop_size * self.resize_size / self.crop_size))
    return dataclasses.replace(self, crop_size=crop_size, resize_size=resize_size)


TORCH = Preprocessing()
CAFFE = Preprocessing(value_range=255.0, channel_order="BGR", mean=CAFFE_MEAN_BGR,
                      std=(1.0, 1.0, 1.0))
# (x / 255 - 0.5) / 0.5 is Keras' x / 127.5 - 1.
TF = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def read_rgb(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255)
             ) -> np.ndarray:
  """Reads an image file as an 8-bit RGB array of shape (height, width, 3).

  The EXIF orientation is applied, so a phone photo is upright as a viewer
  shows it. Transparent images are composited over `background`; 16-bit
  greyscale is scaled down to 8 bits.

  Args:
    path: any format PIL reads (JPEG, PNG, BMP, GIF, TIFF, WebP, ...), or an
      open binary file.
    background: RGB colour behind transparent pixels.

  Returns:
    uint8 array (H, W, 3).

  Examples:
    >>> read_rgb("scan.png").shape
    (480, 640, 3)
  """
  return np.asarray(open_rgb(path, background), dtype=np.uint8)


def open_rgb(path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
  """`read_rgb` as a decoded PIL image in mode "RGB", not yet copied into an array.

  The input pipeline resizes and crops this image and makes an array only
  of the result: each copy of a full-size photo costs about a tenth of its
  decoding time.

  Args:
    path: as for `read_rgb`.
    background: as for `read_rgb`.

  Returns:
    A loaded PIL image, mode "RGB", EXIF orientation applied.
  """
  # A path is opened here and closed once decoded: PIL keeps a file it
  # opened itself open until its image is closed, and this image lives on.
  is_path = isinstance(path, (str, os.PathLike))
  try:
    with open(path, "rb") if is_path else contextlib.nullcontext(path) as file:
      image = Image.open(file)
      image.load()
    # In place: without an orientation tag this does nothing (no copy).
    ImageOps.exif_transpose(image, in_place=True)
    return rgb_image(image, background)
  except Image.DecompressionBombError as e:
    raise ImageError(f"{image_name(path)} is too large to decode safely ({e}). PIL refuses images "
                     "this big as a guard against decompression bombs; downscale it first.") from e
  except (OSError, ValueError, SyntaxError) as e:
    # UnidentifiedImageError (not an image), truncated data, broken headers.
    raise ImageError(f"Cannot read {image_name(path)} as an image: {e}") from e


class ImageError(OSError):
  """An image file that cannot be read (not an image, truncated, too large), named."""


def image_name(path) -> str:
  """How an error names an image: its path, or "an encoded image" for bytes or a file object."""
  return os.fspath(path) if isinstance(path, (str, os.PathLike)) else "an encoded image"


def check_header(path: str | os.PathLike) -> str | None:
  """Why `path` cannot be an image (its header does not parse), or None when it looks fine.

  Reads only the header, so it is cheap; a file truncated in its pixel data
  passes, and fails with its name when decoded.
  """
  try:
    with Image.open(path) as image:
      image.size  # pylint: disable=pointless-statement
  except Image.DecompressionBombError as e:
    return f"too large to decode safely ({e})"
  except (OSError, ValueError, SyntaxError) as e:
    return str(e) or type(e).__name__
  return None


def rgb_image(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)
              ) -> Image.Image:
  """A PIL image of any mode as mode "RGB", as `read_rgb` converts files.

  16-bit greyscale is scaled to 8 bits; transparent pixels are composited
  over `background`. An RGB image is returned as it is (no copy).
  """
  if image.mode == "RGB":
    return image
  if image.mode == "I" or image.mode.startswith("I;16"):
    # PIL's convert("L") clips 16-bit values instead of scaling them.
    pixels = np.asarray(image, dtype=np.float64) / 257.0
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    image = Image.alpha_composite(canvas, rgba)
  return image.convert("RGB")


def resize_and_center_crop(pixels: np.ndarray | Image.Image, resize_size: int, crop_size: int,
                           interpolation: str = "bilinear") -> np.ndarray:
  """Resizes the shorter side to `resize_size` and cuts the centre square.

  Sizes and offsets are computed as torchvision's `Resize(int)` and
  `CenterCrop` compute them, so the result matches torchvision's pipeline on
  the same PIL image.

  Args:
    pixels: uint8 (H, W, 3), or an RGB PIL image.
    resize_size: target length of the shorter side.
    crop_size: side of the square cut from the centre (<= resize_size).
    interpolation: "bilinear", "bicubic", "nearest" or "lanczos".

  Returns:
    uint8 (crop_size, crop_size, 3).

  Examples:
    >>> resize_and_center_crop(np.zeros((300, 400, 3), np.uint8), 256, 224).shape
    (224, 224, 3)
  """
  if crop_size > resize_size:
    raise ValueError(f"crop_size {crop_size} is larger than resize_size {resize_size}.")
  image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
  new_height, new_width, top, left = resize_and_crop_geometry(
      image.height, image.width, resize_size, crop_size)
  # The whole image is resized, then cropped: resizing only the crop's box
  # (PIL's `box=`) is cheaper but moves pixels by up to 2 of 255 from
  # torchvision's, through PIL's rounding of the filter weights.
  resized = image.resize((new_width, new_height), _INTERPOLATIONS[interpolation])
  return np.asarray(resized.crop((left, top, left + crop_size, top + crop_size)), np.uint8)


def resize_and_crop_geometry(height: int, width: int, resize_size: int, crop_size: int
                             ) -> tuple[int, int, int, int]:
  """Where `resize_and_center_crop` resizes to and cuts: torchvision's `Resize(int)` + `CenterCrop`.

  Returns:
    (resized height, resized width, crop top, crop left).
  """
  short, long = min(height, width), max(height, width)
  new_long = int(resize_size * long / short)
  new_height, new_width = ((resize_size, new_long) if height <= width
                           else (new_long, resize_size))
  # Python's round (half to even) is what torchvision's CenterCrop uses.
  top = int(round((new_height - crop_size) / 2.0))
  left = int(round((new_width - crop_size) / 2.0))
  return new_height, new_width, top, left


def normalize(pixels: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
  """uint8 RGB (..., 3) -> float32 scaled, reordered and normalised.

  Args:
    pixels: uint8 RGB array, channels last.
    preprocessing: supplies `value_range`, `channel_order`, `mean` and `std`.

  Returns:
    float32 array of the same shape.

  Examples:
    >>> normalize(np.full((1, 1, 3), 255, np.uint8), TORCH)  # (1 - mean) / std
  """
  x = pixels.astype(np.float32)
  if preprocessing.value_range != 255.0:
    x = x / np.float32(255.0 / preprocessing.value_range)
  if preprocessing.channel_order == "BGR":
    x = x[..., ::-1]
  mean = np.asarray(preprocessing.mean, np.float32)
  std = np.asarray(preprocessing.std, np.float32)
  return ((x - mean) / std).astype(np.float32)


def normalize_on_device(pixels, preprocessing: Preprocessing):
  """`normalize` as jax.numpy operations, for the jitted step on the accelerator.

  Batches leave the host as uint8 (a quarter of the bytes of float32) and
  are scaled, reordered and normalised here, on the device, with the same
  float32 operations in the same order as `normalize`.

  Args:
    pixels: uint8 RGB array (..., 3), e.g. a batch `(B, H, W, 3)`.
    preprocessing: supplies `value_range`, `channel_order`, `mean` and `std`.

  Returns:
    float32 array of the same shape.

  Examples:
    >>> step_images = normalize_on_device(batch["image"], dataset.preprocessing)
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  x = jnp.asarray(pixels).astype(jnp.float32)
  if preprocessing.value_range != 255.0:
    x = x / jnp.float32(255.0 / preprocessing.value_range)
  if preprocessing.channel_order == "BGR":
    x = x[..., ::-1]
  mean = jnp.asarray(preprocessing.mean, jnp.float32)
  std = jnp.asarray(preprocessing.std, jnp.float32)
  return (x - mean) / std


def caffe_normalize(pixels: np.ndarray) -> np.ndarray:
  """Keras' "caffe" mode: RGB -> BGR, minus the ImageNet mean pixel, no scaling.

  Same as `normalize(pixels, CAFFE)`; kept as its own name because Keras
  users look for it.

  Examples:
    >>> caffe_normalize(np.zeros((1, 1, 3), np.uint8))[0, 0]
    array([-103.939, -116.779, -123.68 ], dtype=float32)
  """
  return normalize(pixels, CAFFE)


def preprocess(paths: str | os.PathLike | Iterable[str | os.PathLike],
               preprocessing: Preprocessing = TORCH) -> np.ndarray:
  """Reads image files into one NHWC float32 batch.

  Args:
    paths: one path or several.
    preprocessing: the recipe of the weights the batch is for.

  Returns:
    float32 array (N, crop_size, crop_size, 3).

  Examples:
    >>> preprocess(["a.jpg", "b.png"], CAFFE).shape
    (2, 224, 224, 3)
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  crops: Sequence[np.ndarray] = [
      resize_and_center_crop(read_rgb(p), preprocessing.resize_size,
                             preprocessing.crop_size, preprocessing.interpolation)
      for p in paths]
  if not crops:
    raise ValueError("No images given.")
  return normalize(np.stack(crops), preprocessing)
