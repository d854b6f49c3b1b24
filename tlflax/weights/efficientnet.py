"""EfficientNet weights: torchvision state dicts and Keras files -> tlflax variables.

One name table per source, each generated from the model's stage
specifications, because a block's layer numbering depends on whether its
stage expands (`names_for_torchvision`, `layers_for_keras`).

Keras' input normalisation. keras.applications' EfficientNets start with
`Rescaling(1/255)` and `Normalization` (mean, variance stored in the file)
and, when built with `weights="imagenet"`, a second `Rescaling` by
1/sqrt(std) per channel (Keras' fix for the original TF models, which
divided by std^1.5). tlflax models take normalised images, so these
constants are the weights' `Preprocessing`: pixels in [0, 1] minus the
ImageNet mean, divided by std * sqrt(std) (`KERAS_PREPROCESSING`). The
converter reads the file's Normalization statistics and refuses a file whose
statistics are not the ImageNet ones, which that preprocessing assumes.
"""

from __future__ import annotations

import math
import re

import numpy as np

from tlflax.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from tlflax.models import get_model
from tlflax.models.efficientnet import KERAS_PADDING, MODELS, EfficientNet
from tlflax.weights import keras as keras_weights
from tlflax.weights import torchvision as torchvision_weights
from tlflax.weights.entry import FileHash, PretrainedWeights
from tlflax.weights.merge import WeightsError
from tlflax.weights.reading import read_torch_file


def _efficientnet(model_name: str) -> EfficientNet:
  model = get_model(model_name)
  if not isinstance(model, EfficientNet):
    raise WeightsError(f"{model_name!r} is not an EfficientNet.")
  return model


# ----------------------------------------------------------------------------
# torchvision: features.{i}.{j}.block.{k}.{0: conv, 1: bn}
# ----------------------------------------------------------------------------

def names_for_torchvision(model: EfficientNet) -> tuple[tuple[str, str], ...]:
  """(regex over the PyTorch module name, our path template) for `model`.

  `features.0` is the stem, `features.i` stage i, the last entry `top`;
  `{0+}` is the block number (PyTorch's index plus one), see
  `tlflax.weights.torchvision._fill`.
  """
  table = [(r"features\.0\.0", "stem/conv"), (r"features\.0\.1", "stem/bn")]
  for i, spec in enumerate(model.stages, start=1):
    block = rf"features\.{i}\.(\d+)\.block"
    ours = f"stage{i}/block{{0+}}"
    if spec.fused:
      parts = [("fused_conv", "fused_bn")]
      if spec.expand_ratio != 1:
        parts.append(("project_conv", "project_bn"))
      for k, (conv, bn) in enumerate(parts):
        table += [(rf"{block}\.{k}\.0", f"{ours}/{conv}"), (rf"{block}\.{k}\.1", f"{ours}/{bn}")]
      continue
    k = 0
    if spec.expand_ratio != 1:
      table += [(rf"{block}\.0\.0", f"{ours}/expand_conv"), (rf"{block}\.0\.1", f"{ours}/expand_bn")]
      k = 1
    table += [
        (rf"{block}\.{k}\.0", f"{ours}/dwconv"), (rf"{block}\.{k}\.1", f"{ours}/dw_bn"),
        (rf"{block}\.{k + 1}\.fc1", f"{ours}/se/reduce"),
        (rf"{block}\.{k + 1}\.fc2", f"{ours}/se/expand"),
        (rf"{block}\.{k + 2}\.0", f"{ours}/project_conv"),
        (rf"{block}\.{k + 2}\.1", f"{ours}/project_bn"),
    ]
  top = len(model.stages) + 1
  table += [(rf"features\.{top}\.0", "top/conv"), (rf"features\.{top}\.1", "top/bn"),
            (r"classifier\.1", "head")]
  return tuple(table)


# ----------------------------------------------------------------------------
# Keras: block{i}{a, b, ...}_{layer}
# ----------------------------------------------------------------------------

CONV, DENSE, BATCH_NORM = keras_weights.CONV, keras_weights.DENSE, keras_weights.BATCH_NORM
# Keras 2 names it depthwise_kernel, Keras 3 kernel; either is read by position.
DEPTHWISE = (("depthwise_kernel", "params", "kernel"),)
# The input Normalization layer: checked, not converted (see the module doc).
_NORMALIZATION = r"normalization(_\d+)?"


def layers_for_keras(model: EfficientNet) -> tuple[tuple[str, str, tuple], ...]:
  """(Keras layer name regex, our module path, kind) for every layer with weights.

  Keras letters the blocks of stage i `block{i}a`, `block{i}b`, ...; a stage
  without expansion (stage 1) has no `expand_conv`/`expand_bn`.
  """
  table = [("stem_conv", "stem/conv", CONV), ("stem_bn", "stem/bn", BATCH_NORM)]
  for i, spec in enumerate(model.stages, start=1):
    for j in range(spec.num_blocks):
      keras, ours = f"block{i}{chr(ord('a') + j)}_", f"stage{i}/block{j + 1}/"
      if spec.expand_ratio != 1:
        table += [(keras + "expand_conv", ours + "expand_conv", CONV),
                  (keras + "expand_bn", ours + "expand_bn", BATCH_NORM)]
      table += [(keras + "dwconv", ours + "dwconv", DEPTHWISE),
                (keras + "bn", ours + "dw_bn", BATCH_NORM),
                (keras + "se_reduce", ours + "se/reduce", CONV),
                (keras + "se_expand", ours + "se/expand", CONV),
                (keras + "project_conv", ours + "project_conv", CONV),
                (keras + "project_bn", ours + "project_bn", BATCH_NORM)]
  table += [("top_conv", "top/conv", CONV), ("top_bn", "top/bn", BATCH_NORM),
            ("predictions", "head", DENSE)]
  return tuple(table)


# What keras.applications' EfficientNet Normalization holds with the
# published weights: the ImageNet mean and std squared (Keras' comment on
# tensorflow/tensorflow#49930), on [0, 1] pixels.
KERAS_NORMALIZATION_MEAN = IMAGENET_MEAN
KERAS_NORMALIZATION_VARIANCE = tuple(s * s for s in IMAGENET_STD)
# Rescaling(1/255), Normalization, Rescaling(1/sqrt(std)) as one normalisation:
# (x / 255 - mean) / std / sqrt(std).
KERAS_PREPROCESSING = Preprocessing(mean=IMAGENET_MEAN,
                                    std=tuple(s * math.sqrt(s) for s in IMAGENET_STD))


def check_keras_normalization(keras_layers: dict, path: str) -> None:
  """Removes the input Normalization layer from `keras_layers` after checking it.

  Raises:
    WeightsError: its mean or variance is not the published weights'.
  """
  names = [n for n in keras_layers if re.fullmatch(_NORMALIZATION, n)]
  for name in names:
    weights = keras_layers.pop(name)
    if len(weights) != 3:
      raise WeightsError(f"Keras layer {name!r} in {path!r} has {len(weights)} weights; "
                         "expected mean, variance and count.")
    by_name = dict(weights)
    if set(by_name) != {"mean", "variance", "count"}:  # Keras 3 files: by position
      by_name = dict(zip(("mean", "variance", "count"), (value for _, value in weights)))
    mean, variance = np.ravel(by_name["mean"]), np.ravel(by_name["variance"])
    if not (np.allclose(mean, KERAS_NORMALIZATION_MEAN, rtol=1e-3)
            and np.allclose(variance, KERAS_NORMALIZATION_VARIANCE, rtol=1e-3)):
      raise WeightsError(
          f"{path!r}: its input Normalization layer holds mean {mean.tolist()} and variance "
          f"{variance.tolist()}, but tlflax's keras_efficientnet models take the published "
          f"weights' normalisation (mean {list(KERAS_NORMALIZATION_MEAN)}, variance "
          f"{[round(v, 6) for v in KERAS_NORMALIZATION_VARIANCE]}) as image preprocessing, "
          "outside the network. In Keras, set the layer to those values "
          "(model.get_layer('normalization').set_weights(...)) before saving, or use weights "
          "trained from keras.applications' ImageNet weights.")


def _depthwise_to_flax(flat: dict) -> dict:
  """Keras depthwise kernels (kh, kw, channels, 1) -> flax's (kh, kw, 1, channels)."""
  return {k: (np.swapaxes(v, 2, 3) if k.endswith("/dwconv/kernel") else v)
          for k, v in flat.items()}


def convert(model_name: str, path: str, source: str) -> dict[str, np.ndarray]:
  """Reads a torchvision `.pth` (efficientnet_*) or a Keras file (keras_efficientnet_*).

  Args:
    model_name: e.g. "efficientnet_b0", "efficientnet_v2_s", "keras_efficientnet_b0".
    path: the weight file.
    source: "torchvision" or "keras", whichever publisher the model follows.

  Returns:
    Flat `{"params/...": array, "batch_stats/...": array}` in our names.

  Raises:
    WeightsError: another source, an unreadable file, tensors of another
      architecture, or (Keras) input normalisation other than the published.

  Examples:
    >>> flat = convert("efficientnet_b0", "efficientnet_b0_rwightman-7f5810bc.pth", "torchvision")
  """
  model = _efficientnet(model_name)
  keras_model = model.padding == KERAS_PADDING
  wanted = "keras" if keras_model else "torchvision"
  if source != wanted:
    other = model_name.removeprefix("keras_") if keras_model else f"keras_{model_name}"
    hint = (f"; for {source} files use {other!r}"
            if source in ("torchvision", "keras") and other in MODELS else "")
    raise WeightsError(f"{model_name!r} takes {wanted} weights only (source={wanted!r}), "
                       f"not {source}{hint}.")
  if keras_model:
    keras_layers = keras_weights.read_keras_file(path)
    check_keras_normalization(keras_layers, path)
    flat = keras_weights.convert_layers(keras_layers, layers_for_keras(model), f"a {model_name}")
    return _depthwise_to_flax(flat)
  return torchvision_weights.convert_state_dict(read_torch_file(path), model,
                                                names=names_for_torchvision(model))


# ----------------------------------------------------------------------------
# Published weights
# ----------------------------------------------------------------------------

_TORCHVISION_URL = "https://download.pytorch.org/models/"
_TORCHVISION_HASH_ORIGIN = ("the sha256 prefix in torchvision's file name "
                            "(what torch.hub checks)")
# From the installed torchvision's EfficientNet_*_Weights: (model, tag, file,
# crop, resize, interpolation, mean/std, top-1).
_TV_V2_MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_TORCHVISION = (
    ("efficientnet_b0", "tv_in1k", "efficientnet_b0_rwightman-7f5810bc.pth", 224, 256,
     "bicubic", {}, 77.692),
    ("efficientnet_b1", "tv_in1k", "efficientnet_b1_rwightman-bac287d4.pth", 240, 256,
     "bicubic", {}, 78.642),
    ("efficientnet_b1", "tv2_in1k", "efficientnet_b1-c27df63c.pth", 240, 255,
     "bilinear", {}, 79.838),
    ("efficientnet_b2", "tv_in1k", "efficientnet_b2_rwightman-c35c1473.pth", 288, 288,
     "bicubic", {}, 80.608),
    ("efficientnet_b3", "tv_in1k", "efficientnet_b3_rwightman-b3899882.pth", 300, 320,
     "bicubic", {}, 82.008),
    ("efficientnet_b4", "tv_in1k", "efficientnet_b4_rwightman-23ab8bcd.pth", 380, 384,
     "bicubic", {}, 83.384),
    ("efficientnet_b5", "tv_in1k", "efficientnet_b5_lukemelas-1a07897c.pth", 456, 456,
     "bicubic", {}, 83.444),
    ("efficientnet_b6", "tv_in1k", "efficientnet_b6_lukemelas-24a108a5.pth", 528, 528,
     "bicubic", {}, 84.008),
    ("efficientnet_b7", "tv_in1k", "efficientnet_b7_lukemelas-c5b4e57e.pth", 600, 600,
     "bicubic", {}, 84.122),
    ("efficientnet_v2_s", "tv_in1k", "efficientnet_v2_s-dd5fe13b.pth", 384, 384,
     "bilinear", {}, 84.228),
    ("efficientnet_v2_m", "tv_in1k", "efficientnet_v2_m-dc08266a.pth", 480, 480,
     "bilinear", {}, 85.112),
    ("efficientnet_v2_l", "tv_in1k", "efficientnet_v2_l-59c71312.pth", 480, 480,
     "bicubic", _TV_V2_MEAN_STD, 85.808),
)

_KERAS_URL = "https://storage.googleapis.com/keras-applications/"
_KERAS_HASH_ORIGIN = "the md5 keras.applications passes to keras.utils.get_file"
# WEIGHTS_HASHES[variant][0] (the file with the top) in
# keras/src/applications/efficientnet.py, and each variant's default input
# size. The files are Google's TF EfficientNets, which are evaluated with a
# bicubic resize to crop / crop_pct and a centre crop; crop_pct as timm's
# tf_efficientnet_b*.in1k configurations give it (resize = floor(crop / pct)).
_KERAS = (
    ("b0", "902e53a9f72be733fc0bcb005b3ebbac", 224, 0.875),
    ("b1", "1d254153d4ab51201f1646940f018540", 240, 0.882),
    ("b2", "b15cce36ff4dcbd00b6dd88e7857a6ad", 260, 0.890),
    ("b3", "ffd1fdc53d0ce67064dc6a9c7960ede0", 300, 0.904),
    ("b4", "18c95ad55216b8f92d7e70b3a046e2fc", 380, 0.922),
    ("b5", "ace28f2a6363774853a83a0b21b9421a", 456, 0.934),
    ("b6", "165f6e37dce68623721b423839de8be5", 528, 0.942),
    ("b7", "8c03f828fec3ef71311cd463b6759d99", 600, 0.949),
)


def _torchvision_entries():
  for model_name, tag, file_name, crop, resize, interpolation, mean_std, top1 in _TORCHVISION:
    sha256_prefix = file_name.rsplit("-", 1)[1].split(".")[0]
    yield PretrainedWeights(
        id=f"{model_name}.{tag}", model_name=model_name, source="torchvision",
        url=_TORCHVISION_URL + file_name, file_name=file_name,
        hash=FileHash("sha256", sha256_prefix, _TORCHVISION_HASH_ORIGIN),
        preprocessing=Preprocessing(crop_size=crop, resize_size=resize,
                                    interpolation=interpolation, **mean_std),
        reported_top1=top1)


def _keras_entries():
  for variant, md5, crop, crop_pct in _KERAS:
    file_name = f"efficientnet{variant}.h5"
    preprocessing = Preprocessing(crop_size=crop, resize_size=math.floor(crop / crop_pct),
                                  interpolation="bicubic", mean=KERAS_PREPROCESSING.mean,
                                  std=KERAS_PREPROCESSING.std)
    yield PretrainedWeights(
        id=f"keras_efficientnet_{variant}.in1k", model_name=f"keras_efficientnet_{variant}",
        source="keras", url=_KERAS_URL + file_name, file_name=file_name,
        hash=FileHash("md5", md5, _KERAS_HASH_ORIGIN), preprocessing=preprocessing)


PRETRAINED = (*_torchvision_entries(), *_keras_entries())
