"""ConvNeXt weights: torchvision and timm files -> tlflax variables, and the published files.

One table per source maps its module names to ours (`TORCHVISION_NAMES`,
`TIMM_NAMES`); both are read by the torchvision-layout converter
(`tlflax.weights.torchvision.convert_state_dict`), which converts kernels,
dense weights and LayerNorm scales by their shape. The one tensor it does
not know is the per-channel layer scale, a bare parameter of each block
(torchvision `layer_scale` of shape (C, 1, 1), timm `gamma` of shape (C,));
it is taken out first and placed at the block's path from the same table.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from tlflax.data.images import Preprocessing
from tlflax.models import get_model
from tlflax.weights.entry import FileHash, PretrainedWeights
from tlflax.weights.merge import WeightsError
from tlflax.weights.reading import read_torch_file
from tlflax.weights.torchvision import _fill, convert_state_dict

# The block's own parameter, under each source's name.
LAYER_SCALE_LEAF = {"torchvision": "layer_scale", "timm": "gamma"}


def _torchvision_names() -> tuple[tuple[str, str], ...]:
  """torchvision numbers `features` in order: stem, stage, downsample, stage, ..."""
  table = [(r"features\.0\.0", "stem/conv"), (r"features\.0\.1", "stem/norm")]
  for stage in range(1, 5):
    blocks = rf"features\.{2 * stage - 1}\.(\d+)"
    if stage > 1:  # the downsampling layer before this stage
      table += [(rf"features\.{2 * stage - 2}\.0", f"stage{stage}/downsample_norm"),
                (rf"features\.{2 * stage - 2}\.1", f"stage{stage}/downsample_conv")]
    table += [(blocks + r"\.block\.0", f"stage{stage}/block{{0+}}/dwconv"),
              (blocks + r"\.block\.2", f"stage{stage}/block{{0+}}/norm"),
              (blocks + r"\.block\.3", f"stage{stage}/block{{0+}}/fc1"),
              (blocks + r"\.block\.5", f"stage{stage}/block{{0+}}/fc2"),
              (blocks, f"stage{stage}/block{{0+}}")]  # owns `layer_scale`
  table += [(r"classifier\.0", "final_norm"), (r"classifier\.2", "head")]
  return tuple(table)


TORCHVISION_NAMES = _torchvision_names()

# timm counts stages from 0 and keeps each downsampling layer in its stage.
TIMM_NAMES = (
    (r"stem\.0", "stem/conv"),
    (r"stem\.1", "stem/norm"),
    (r"stages\.(\d)\.downsample\.0", "stage{0+}/downsample_norm"),
    (r"stages\.(\d)\.downsample\.1", "stage{0+}/downsample_conv"),
    (r"stages\.(\d)\.blocks\.(\d+)\.conv_dw", "stage{0+}/block{1+}/dwconv"),
    (r"stages\.(\d)\.blocks\.(\d+)\.norm", "stage{0+}/block{1+}/norm"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1", "stage{0+}/block{1+}/fc1"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2", "stage{0+}/block{1+}/fc2"),
    (r"stages\.(\d)\.blocks\.(\d+)", "stage{0+}/block{1+}"),  # owns `gamma`
    (r"head\.norm", "final_norm"),
    (r"head\.fc", "head"),
)

NAMES = {"torchvision": TORCHVISION_NAMES, "timm": TIMM_NAMES}


def _take_layer_scales(state_dict: Mapping[str, np.ndarray], source: str):
  """Splits off the layer scales: (their flat tlflax entries, the other tensors)."""
  leaf = LAYER_SCALE_LEAF[source]
  table = [(re.compile(p), t) for p, t in NAMES[source]]
  scales, rest = {}, {}
  for key, value in state_dict.items():
    module_name, _, name = key.rpartition(".")
    path = next((_fill(t, m) for p, t in table if (m := p.fullmatch(module_name))), None)
    if name == leaf and path is not None and re.fullmatch(r"stage\d/block\d+", path):
      scales[f"params/{path}/layer_scale"] = np.asarray(value, np.float32).reshape(-1)
    else:
      rest[key] = value
  return scales, rest


def convert(model_name: str, path: str, source: str) -> dict[str, np.ndarray]:
  """Reads a torchvision or timm ConvNeXt file for `model_name`.

  Args:
    model_name: "convnext_tiny", "convnext_small", "convnext_base" or "convnext_large".
    path: a `.pth` or `.safetensors` state dict.
    source: "torchvision" or "timm" (their module names differ).

  Returns:
    Flat `{"params/stage1/block1/dwconv/kernel": array, ...}`.

  Raises:
    WeightsError: another source, or tensors with no place in a ConvNeXt
      (e.g. a torchvision file read as timm's).

  Examples:
    >>> flat = convert("convnext_tiny", "convnext_tiny-983f1562.pth", "torchvision")
  """
  if source not in NAMES:
    raise WeightsError(f"{model_name!r} weights come from {' or '.join(NAMES)}, not "
                       f"{source}; pass one of those sources (or a tlflax checkpoint).")
  scales, rest = _take_layer_scales(read_torch_file(path), source)
  flat = convert_state_dict(rest, get_model(model_name), names=NAMES[source])
  return {**flat, **scales}


_TORCHVISION_HASH_ORIGIN = ("the sha256 prefix in torchvision's file name "
                            "(what torch.hub checks)")
# (model, torchvision IMAGENET1K_V1 file, resize size, reported top-1) from the
# installed torchvision's ConvNeXt_*_Weights: 224 px crops, bilinear, ImageNet mean/std.
_TORCHVISION = (
    ("convnext_tiny", "convnext_tiny-983f1562.pth", 236, 82.520),
    ("convnext_small", "convnext_small-0c510722.pth", 230, 83.616),
    ("convnext_base", "convnext_base-6075fbad.pth", 232, 84.062),
    ("convnext_large", "convnext_large-ea097f82.pth", 232, 84.414),
)

_TIMM_NO_HASH = ("timm publishes no hash for its Hugging Face safetensors files; "
                 "only a complete download is kept, and its sha256 is logged")
# timm's default_cfgs for the `fb_in1k` tags: 224 px at crop_pct 0.875
# (resize to floor(224 / 0.875) = 256), bicubic, ImageNet mean/std.
_TIMM_FB_IN1K = Preprocessing(crop_size=224, resize_size=256, interpolation="bicubic")


def _entries():
  for model_name, file_name, resize_size, top1 in _TORCHVISION:
    yield PretrainedWeights(
        id=f"{model_name}.tv_in1k", model_name=model_name, source="torchvision",
        url="https://download.pytorch.org/models/" + file_name, file_name=file_name,
        hash=FileHash("sha256", file_name.rsplit("-", 1)[1].split(".")[0],
                      _TORCHVISION_HASH_ORIGIN),
        preprocessing=Preprocessing(crop_size=224, resize_size=resize_size),
        class_names="imagenet1k", reported_top1=top1)
  for model_name, _, _, _ in _TORCHVISION:
    timm_id = f"{model_name}.fb_in1k"
    yield PretrainedWeights(
        id=timm_id, model_name=model_name, source="timm",
        url=f"https://huggingface.co/timm/{timm_id}/resolve/main/model.safetensors",
        # Every timm file is called model.safetensors; the id keeps them apart.
        file_name=f"{timm_id}.safetensors", hash=None, hash_note=_TIMM_NO_HASH,
        preprocessing=_TIMM_FB_IN1K, class_names="imagenet1k")


# torchvision first: `registry.default_preprocessing` takes a model's first entry.
PRETRAINED = tuple(_entries())
