"""Checking converted weights against a model, and merging them into its variables.

A converter turns a source's tensors into a flat dict `{"params/stem/conv/kernel":
array, "batch_stats/stem/bn/mean": array, ...}`. `check_fits` compares it with
the shapes `model.init` would produce, and `merge_pretrained` puts it into a
model that may have a different head, reporting exactly what happened.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tlflax import tree
from tlflax.tree import flatten, unflatten


class WeightsError(ValueError):
  """A weight file that cannot be used, with what to do about it."""


def model_shapes(model, image_size: int = 32) -> dict[str, tuple[int, ...]]:
  """Shapes of every variable `model.init` creates, without computing anything.

  A model whose class declares `min_input_size` (InceptionV3's unpadded
  convolutions need 75 px) is traced at least at that size; the variables'
  shapes do not depend on it.
  """
  image_size = max(image_size, getattr(model, "min_input_size", 0))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
  return tree.shapes(variables)



def format_mismatch(what: str, file_shapes: Mapping[str, tuple],
                    model_shapes_: Mapping[str, tuple]) -> str:
  """One readable message: what is missing, extra or misshapen, parameters first."""
  unexpected, missing, misshapen = tree.differences(file_shapes, model_shapes_)
  lines = [f"The weights do not fit {what}:"]
  for title, keys in (("missing from the file", missing),
                      ("in the file but not in the model", unexpected)):
    if keys:
      lines.append(tree.listing(title, keys))
  for key in misshapen[:8]:
    lines.append(f"  shape of {key}: file {file_shapes[key]}, model {model_shapes_[key]}")
  lines.append("Check that the model name matches the architecture the file was saved from.")
  return "\n".join(lines)


def describe_mismatch(converted: Mapping[str, np.ndarray],
                      expected: Mapping[str, tuple[int, ...]], what: str) -> str | None:
  """A readable list of missing, unexpected and misshapen variables, or None."""
  have = {k: tuple(np.shape(v)) for k, v in converted.items()}
  want = {k: tuple(v) for k, v in expected.items()}
  return format_mismatch(what, have, want) if have != want else None


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
  merged, unexplained_file, unexplained_model = {}, {}, {}
  for key, value in init_flat.items():
    if key in file_flat and np.shape(file_flat[key]) == np.shape(value):
      merged[key] = jnp.asarray(file_flat[key], dtype=value.dtype)
      loaded.append(key)
    elif any(re.fullmatch(p, key) for p in reinit):
      merged[key] = value
      reinitialised.append(key)
    else:  # missing from the file, or of another shape there
      unexplained_model[key] = tuple(np.shape(value))
      if key in file_flat:
        unexplained_file[key] = tuple(np.shape(file_flat[key]))
  for key in file_flat.keys() - init_flat.keys():
    if any(re.fullmatch(p, key) for p in reinit):
      skipped.append(key)
    else:
      unexplained_file[key] = tuple(np.shape(file_flat[key]))
  if unexplained_file or unexplained_model:
    raise WeightsError(format_mismatch(
        "the model (only variables matching `reinit` may be re-initialised)",
        unexplained_file, unexplained_model))
  return unflatten(merged), MergeReport(sorted(loaded), sorted(reinitialised), sorted(skipped))
