"""timm checkpoints (`.safetensors` or `.pth`) -> tlflax variables.

timm's ResNets (`resnet18` ... `resnet152`, `wide_resnet50_2`,
`resnext50_32x4d`, e.g. the `a1_in1k` weights) keep torchvision's module
names, so they share its name table; only the file format differs (timm
publishes safetensors, which cannot carry code).
"""

from __future__ import annotations

import numpy as np

from tlflax.models import get_model, resnet
from tlflax.weights.merge import WeightsError
from tlflax.weights.reading import read_torch_file
from tlflax.weights.torchvision import convert_state_dict


def convert(model_name: str, path: str) -> dict[str, np.ndarray]:
  """Reads a timm ResNet checkpoint for `model_name`."""
  model = get_model(model_name)
  if not isinstance(model, resnet.ResNet) or model.cifar_stem:
    raise WeightsError(f"timm weights are supported for the ImageNet ResNets, not {model_name!r}.")
  state_dict = read_torch_file(path)
  if any(k.startswith(("conv1.0.", "stem.")) for k in state_dict):
    raise WeightsError(f"{path!r} is a timm ResNet with a deep stem (resnet*d / *c "
                       "variants), which tlflax does not build; use the plain variant.")
  return convert_state_dict(state_dict, model)
