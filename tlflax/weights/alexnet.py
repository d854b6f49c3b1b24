"""AlexNet weights: torchvision `.pth` files -> tlflax variables, and the published file.

torchvision is AlexNet's only source. Its `features` are numbered
sequentially (conv, ReLU, pool, ...), its `classifier` likewise (dropout,
linear, ReLU, ...); `TORCHVISION_NAMES` says where each layer goes.
"""

from __future__ import annotations

import numpy as np

from tlflax.data.images import TORCH
from tlflax.models import get_model
from tlflax.weights.entry import FileHash, PretrainedWeights
from tlflax.weights.merge import WeightsError
from tlflax.weights.reading import read_torch_file
from tlflax.weights.torchvision import convert_state_dict, nchw_flatten_to_nhwc

# (regex over torchvision's module name, our module path)
TORCHVISION_NAMES = (
    (r"features\.0", "stage1/conv1"),
    (r"features\.3", "stage2/conv2"),
    (r"features\.6", "stage3/conv3"),
    (r"features\.8", "stage3/conv4"),
    (r"features\.10", "stage3/conv5"),
    (r"classifier\.1", "fc/dense1"),
    (r"classifier\.4", "fc/dense2"),
    (r"classifier\.6", "head"),
)

SOURCES = ("torchvision",)


def _first_dense_kernel(weight: np.ndarray) -> np.ndarray:
  """torchvision flattens the 256x6x6 map in NCHW order, we in NHWC."""
  return nchw_flatten_to_nhwc(weight, channels=256, size=6)


def convert(model_name: str, path: str, source: str) -> dict[str, np.ndarray]:
  """Reads an AlexNet weight file.

  Args:
    model_name: "alexnet".
    path: a torchvision state dict (`.pth`, or `.safetensors` of the same names).
    source: must be "torchvision".

  Returns:
    Flat `{"params/stage1/conv1/kernel": array, ...}`.

  Raises:
    WeightsError: another source, or tensors that are not AlexNet's.

  Examples:
    >>> flat = convert("alexnet", "alexnet-owt-7be5be79.pth", "torchvision")
  """
  if source not in SOURCES:
    raise WeightsError(f"{model_name!r} weights come from {', '.join(SOURCES)} only, "
                       f"not {source}; pass source='torchvision' (or a tlflax checkpoint).")
  return convert_state_dict(read_torch_file(path), get_model(model_name),
                            transforms={"fc/dense1/kernel": _first_dense_kernel},
                            names=TORCHVISION_NAMES)


# torchvision's AlexNet_Weights.IMAGENET1K_V1: 256 -> 224 bilinear, ImageNet mean/std.
PRETRAINED = (
    PretrainedWeights(
        id="alexnet.tv_in1k", model_name="alexnet", source="torchvision",
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        file_name="alexnet-owt-7be5be79.pth",
        hash=FileHash("sha256", "7be5be79", "the sha256 prefix in torchvision's file name "
                      "(what torch.hub checks)"),
        preprocessing=TORCH, class_names="imagenet1k", reported_top1=56.522),
)
