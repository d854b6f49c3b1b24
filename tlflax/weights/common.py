"""What every weight source shares: safe file reading, path trees, checks, merge.

A converter turns a source's tensors into a flat dict `{"params/stem/conv/kernel":
array, "batch_stats/stem/bn/mean": array, ...}`. `check_fits` then compares it
with the shapes `model.init` would produce, and `merge_pretrained` puts it into
a model that may have a different head, reporting exactly what happened.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from typing import Any, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np


class WeightsError(ValueError):
  """A weight file that cannot be used, with what to do about it."""


# ----------------------------------------------------------------------------
# Path trees
# ----------------------------------------------------------------------------

def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """`{"params": {"stem": {"conv": {"kernel": x}}}}` -> `{"params/stem/conv/kernel": x}`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  return dict(flat)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def model_shapes(model, image_size: int = 32) -> dict[str, tuple[int, ...]]:
  """Shapes of every variable `model.init` creates, without computing anything."""
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  return {k: tuple(v.shape) for k, v in flatten(variables).items()}


# ----------------------------------------------------------------------------
# Reading files without executing code
# ----------------------------------------------------------------------------

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
          "to .safetensors.\nDetail: " + message.splitlines()[0]) from e
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


# ----------------------------------------------------------------------------
# Checking and merging
# ----------------------------------------------------------------------------

def _params_first(keys):
  return sorted(keys, key=lambda k: (not k.startswith("params/"), k))


def format_mismatch(what: str, missing: Iterable[str], unexpected: Iterable[str],
                    misshapen: Mapping[str, tuple[tuple, tuple]]) -> str:
  """One readable message: counts per kind of problem, parameters listed first."""
  lines = [f"The weights do not fit {what}:"]
  for title, keys in (("missing from the file", missing),
                      ("in the file but not in the model", unexpected)):
    keys = _params_first(keys)
    if keys:
      lines.append(f"  {len(keys)} {title}: " + ", ".join(keys[:8])
                   + (" ..." if len(keys) > 8 else ""))
  for k in _params_first(misshapen)[:8]:
    lines.append(f"  shape of {k}: file {misshapen[k][0]}, model {misshapen[k][1]}")
  lines.append("Check that the model name matches the architecture the file was saved from.")
  return "\n".join(lines)


def describe_mismatch(converted: Mapping[str, np.ndarray],
                      expected: Mapping[str, tuple[int, ...]], what: str) -> str | None:
  """A readable list of missing, unexpected and misshapen variables, or None."""
  missing = set(expected) - set(converted)
  unexpected = set(converted) - set(expected)
  misshapen = {k: (tuple(np.shape(converted[k])), tuple(expected[k]))
               for k in set(expected) & set(converted)
               if tuple(np.shape(converted[k])) != tuple(expected[k])}
  if not (missing or unexpected or misshapen):
    return None
  return format_mismatch(what, missing, unexpected, misshapen)


def check_fits(converted: Mapping[str, np.ndarray], model, what: str) -> None:
  """Raises `WeightsError` unless `converted` has exactly `model`'s variables."""
  problem = describe_mismatch(converted, model_shapes(model), what)
  if problem:
    raise WeightsError(problem)


@dataclasses.dataclass
class MergeReport:
  """What `merge_pretrained` did with each variable."""
  loaded: list[str]
  reinitialised: list[str]
  skipped: list[str]

  def __str__(self):
    def count(keys):
      return f"{len(keys)}" + (f" ({', '.join(keys)})" if keys and len(keys) <= 6 else "")
    return (f"loaded {len(self.loaded)} variables; re-initialised "
            f"{count(self.reinitialised)}; skipped from the file {count(self.skipped)}")


def merge_pretrained(init_variables: Mapping[str, Any], pretrained: Mapping[str, Any],
                     reinit: Iterable[str] = (r"(params|batch_stats)/head(/.*)?",),
                     ) -> tuple[dict[str, Any], MergeReport]:
  """Puts pretrained variables into a freshly initialised model.

  Variables matching `reinit` (by default the `head`) keep their fresh values
  when the file lacks them or has another shape (a new number of classes), and
  file variables matching `reinit` that the model lacks (no head) are skipped.
  Anything else that does not fit is an error naming the keys and shapes.

  Args:
    init_variables: `model.init(...)` of the target model.
    pretrained: variables from `tlflax.weights.load`.
    reinit: regexes over `/`-joined variable paths that may be re-initialised.

  Returns:
    `(variables, report)`.
  """
  reinit = tuple(reinit)
  init_flat, file_flat = flatten(init_variables), flatten(pretrained)
  loaded, reinitialised, skipped = [], [], []
  missing, unexpected, misshapen = [], [], {}
  merged = {}
  for key, value in init_flat.items():
    may_reinit = any(re.fullmatch(p, key) for p in reinit)
    if key in file_flat and np.shape(file_flat[key]) == np.shape(value):
      merged[key] = jnp.asarray(file_flat[key], dtype=value.dtype)
      loaded.append(key)
    elif may_reinit:
      merged[key] = value
      reinitialised.append(key)
    elif key in file_flat:
      misshapen[key] = (np.shape(file_flat[key]), np.shape(value))
    else:
      missing.append(key)
  for key in file_flat.keys() - init_flat.keys():
    if any(re.fullmatch(p, key) for p in reinit):
      skipped.append(key)
    else:
      unexpected.append(key)
  if missing or unexpected or misshapen:
    raise WeightsError(format_mismatch(
        "the model (only variables matching `reinit` may be re-initialised)",
        missing, unexpected, misshapen))
  return unflatten(merged), MergeReport(sorted(loaded), sorted(reinitialised), sorted(skipped))
