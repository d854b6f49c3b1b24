"""torchvision (and torchvision-layout) state dicts -> tlflax variables.

Each model family has one table from PyTorch module names to our module paths.
The tensor itself says how to convert it: a 4-D `weight` is a convolution
(OIHW -> HWIO), a 2-D one a linear layer (transposed), a 1-D one a BatchNorm
scale; running statistics go to `batch_stats`.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

from tlflax.models import get_model, resnet, vgg
from tlflax.weights.merge import WeightsError
from tlflax.weights.reading import read_torch_file

# (regex over the PyTorch module name, our module path template)
RESNET_NAMES = (
    (r"conv1", "stem/conv"),
    (r"bn1", "stem/bn"),
    (r"layer(\d+)\.(\d+)\.conv(\d)", "stage{0}/block{1+}/conv{2}"),
    (r"layer(\d+)\.(\d+)\.bn(\d)", "stage{0}/block{1+}/bn{2}"),
    (r"layer(\d+)\.(\d+)\.downsample\.0", "stage{0}/block{1+}/downsample_conv"),
    (r"layer(\d+)\.(\d+)\.downsample\.1", "stage{0}/block{1+}/downsample_bn"),
    (r"fc", "head"),
    (r"linear", "head"),  # the CIFAR ResNets' name for the classifier
)

_LEAF = {
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def vgg_names(stages, batch_norm: bool) -> tuple[tuple[str, str], ...]:
  """torchvision numbers VGG's `features` sequentially: conv, [bn], relu, ..., pool."""
  table, index = [], 0
  for i, channels in enumerate(stages):
    for j in range(len(channels)):
      table.append((rf"features\.{index}", f"stage{i + 1}/conv{j + 1}"))
      if batch_norm:
        table.append((rf"features\.{index + 1}", f"stage{i + 1}/bn{j + 1}"))
      index += 3 if batch_norm else 2
    index += 1  # max pool
  table += [(r"classifier\.0", "fc/dense1"), (r"classifier\.3", "fc/dense2"),
            (r"classifier\.6", "head")]
  return tuple(table)


def _fill(template: str, match: re.Match) -> str:
  """"stage{0}/block{1+}" -> "stage2/block1" for groups ("2", "0"); `+` adds one."""
  def replace(m):
    value = match.group(int(m.group(1)) + 1)
    return str(int(value) + 1) if m.group(2) else value
  return re.sub(r"\{(\d)(\+?)\}", replace, template)


def names_for(model) -> tuple[tuple[str, str], ...]:
  if isinstance(model, resnet.ResNet):
    return RESNET_NAMES
  if isinstance(model, vgg.VGG):
    return vgg_names(model.stages, model.batch_norm)
  raise WeightsError(f"{type(model).__name__} models have no torchvision layout; "
                     "use the source they were made for.")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model,
                       transforms: Mapping[str, Callable] | None = None,
                       names: tuple[tuple[str, str], ...] | None = None) -> dict[str, np.ndarray]:
  """Renames and reshapes a torchvision-layout state dict for `model`.

  Args:
    state_dict: PyTorch names -> numpy arrays.
    model: the tlflax module the weights are for (selects the name table).
    transforms: extra `{our kernel path: fn(torch weight) -> kernel}`, e.g.
      VGG's first dense layer, whose inputs are flattened in another order.
    names: the `(regex, our path template)` table to use instead of the
      model's own (the families in `tlflax/weights/<family>.py` pass theirs).

  Returns:
    Flat `{"params/stage1/block1/conv1/kernel": array, ...}`.
  """
  table = [(re.compile(pattern), template)
           for pattern, template in (names if names is not None else names_for(model))]
  transforms = dict(transforms or {})
  flat, unknown = {}, []
  for key, value in state_dict.items():
    module_name, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
      continue  # PyTorch's step counter; BatchNorm here uses a fixed momentum.
    path = next((_fill(t, m) for p, t in table if (m := p.fullmatch(module_name))), None)
    if path is None or (leaf != "weight" and leaf not in _LEAF):
      unknown.append(key)
      continue
    value = np.asarray(value, np.float32)
    if leaf == "weight":
      if value.ndim == 4:
        collection, name, value = "params", "kernel", value.transpose(2, 3, 1, 0)
      elif value.ndim == 2:
        fix = transforms.get(f"{path}/kernel")
        collection, name, value = "params", "kernel", fix(value) if fix else value.T
      else:
        collection, name = "params", "scale"
    else:
      collection, name = _LEAF[leaf]
    flat[f"{collection}/{path}/{name}"] = value
  if unknown:
    raise WeightsError(
        f"{len(unknown)} tensors have no place in a {type(model).__name__}: "
        + ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        + ". Is the file for another architecture, or from another source?")
  return flat


def nchw_flatten_to_nhwc(weight: np.ndarray, channels: int = 512, size: int = 7) -> np.ndarray:
  """A dense layer after torchvision's NCHW flatten -> the same after NHWC flatten."""
  out = weight.shape[0]
  return weight.reshape(out, channels, size, size).transpose(2, 3, 1, 0).reshape(-1, out)


def convert(model_name: str, path: str) -> dict[str, np.ndarray]:
  """Reads a torchvision `.pth` (zip or legacy pickle) for `model_name`."""
  model = get_model(model_name)
  transforms = {}
  if isinstance(model, vgg.VGG):
    transforms["fc/dense1/kernel"] = nchw_flatten_to_nhwc
  return convert_state_dict(read_torch_file(path), model, transforms)
