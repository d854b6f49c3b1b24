"""Reading weight files (PyTorch pickles, safetensors) without executing code."""

from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping

import numpy as np

from tlflax.weights.merge import WeightsError


def require_file(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise WeightsError(f"Weight file {path!r} does not exist.")
  if os.path.getsize(path) == 0:
    raise WeightsError(f"Weight file {path!r} is empty; download it again.")
  return path


def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch `.pth`/`.pt`/`.th` or a `.safetensors` file into numpy arrays.

  Pickles are read with `torch.load(weights_only=True)`, which never runs code
  from the file: a pickle that needs anything beyond tensors and plain
  containers is refused. A state dict nested under "state_dict" or "model" is
  unwrapped, and a DataParallel "module." prefix is stripped.
  """
  path = require_file(path)
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise WeightsError(
        "Reading PyTorch pickles needs torch: pip install 'tlflax[torch]'. "
        "Files in .safetensors format need no torch.") from e
  with open(path, "rb") as f:
    start = f.read(8)
  if not (zipfile.is_zipfile(path) or start[:1] == b"\x80"):
    # Neither torch.save's zip archive nor a (protocol 2+) pickle.
    raise WeightsError(f"{path!r} is not a PyTorch weight file: it is neither a zip archive "
                       f"nor a pickle (it starts with {start!r}). Pass the .pth/.pt file "
                       "torch.save wrote, or a .safetensors file.")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for bad pickles
    message = str(e)
    if "Weights only load failed" in message or "Unsupported global" in message:
      raise WeightsError(
          f"{path!r} is a pickle that needs more than tensors to load (it would "
          "run code, or contains objects of unknown classes). tlflax only reads "
          "weights with torch.load(weights_only=True). If you trust the file, "
          "load it yourself and save `model.state_dict()` again, or convert it "
          "to .safetensors. Detail: " + message.splitlines()[0]) from e
    kind = "a zip archive" if zipfile.is_zipfile(path) else "not a zip archive"
    raise WeightsError(
        f"Could not read {path!r} as a PyTorch weight file ({kind}; it may be "
        f"truncated or of another format): {message.splitlines()[0] if message else type(e).__name__}"
    ) from e
  return _state_dict_to_numpy(_unwrap_state_dict(obj, path))


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  try:
    return dict(load_file(path))
  except Exception as e:
    raise WeightsError(f"Could not read {path!r} as safetensors (truncated or "
                       f"another format?): {e}") from e


def _unwrap_state_dict(obj: Any, path: str) -> Mapping[str, Any]:
  for key in ("state_dict", "model", "model_state_dict"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping) or not obj:
    raise WeightsError(f"{path!r} holds no state dict (a mapping of names to tensors), "
                       f"but a {type(obj).__name__}.")
  keys = list(obj)
  if all(isinstance(k, str) and k.startswith("module.") for k in keys):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def _state_dict_to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  arrays = {}
  for key, value in state_dict.items():
    if hasattr(value, "detach"):
      value = value.detach().cpu()
      if str(value.dtype) == "torch.bfloat16":
        value = value.float()
      value = value.numpy()
    if isinstance(value, np.ndarray):
      arrays[key] = value
  return arrays
