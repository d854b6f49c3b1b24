"""Trees of variables and configs as flat dicts, and how two of them differ.

Variables are addressed by `/`-joined paths (`params/stage1/block1/conv1/kernel`),
the form freeze rules, weight converters and checkpoints all use; configs by
dotted keys (`optimizer.learning_rate`), the form of `--config.` flags and
sweep points.

    >>> flatten({"params": {"head": {"bias": b}}})
    {'params/head/bias': b}
    >>> flatten_dotted({"optimizer": {"learning_rate": 0.1}})
    {'optimizer.learning_rate': 0.1}
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

import flax
import jax
import numpy as np


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """`{"params": {"stem": {"conv": {"kernel": x}}}}` -> `{"params/stem/conv/kernel": x}`."""
  return dict(flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/"))


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `flatten`."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def flatten_dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
  """A nested dict or ConfigDict as `{"dotted.key": value}`."""
  if hasattr(tree, "to_dict"):  # a ConfigDict is no Mapping
    tree = tree.to_dict()
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten_dotted(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def path_string(key_path) -> str:
  """A `jax.tree_util` key path as a `/`-joined string."""
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def leaves_with_paths(tree) -> dict[str, Any]:
  """`{path string: leaf}` for any pytree (dicts, dataclasses, optax states)."""
  return {path_string(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def params_first(keys: Iterable[str]) -> list[str]:
  """Paths sorted with `params/...` first, then `batch_stats/...`, then the rest.

  Parameter differences explain the most (another architecture or head), so
  error messages lead with them.
  """
  order = {"params": 0, "batch_stats": 1}
  return sorted(keys, key=lambda k: (order.get(k.split("/")[0], 2), k))


def differences(have: Mapping[str, Any], want: Mapping[str, Any]
                ) -> tuple[list[str], list[str], list[str]]:
  """How two `{path: description}` dicts differ (descriptions compared with `==`).

  Args:
    have: what was found (a file, a checkpoint), e.g. path -> shape.
    want: what was expected (a model, a run's state).

  Returns:
    `(only in have, only in want, in both but different)`, each sorted with
    parameters first.

  Examples:
    >>> differences({"params/a": (3,), "params/b": (1,)}, {"params/a": (4,)})
    (['params/b'], [], ['params/a'])
  """
  return (params_first(set(have) - set(want)), params_first(set(want) - set(have)),
          params_first(k for k in set(have) & set(want) if have[k] != want[k]))


def listing(title: str, keys: Sequence[str], limit: int = 8) -> str:
  """`"  3 missing from the file: a, b ..."`: a count, a title and the first `limit` paths."""
  return (f"  {len(keys)} {title}: " + ", ".join(keys[:limit])
          + (" ..." if len(keys) > limit else ""))


def shapes(tree) -> dict[str, tuple[int, ...]]:
  """`{path: shape}` of a variables tree (arrays or ShapeDtypeStructs)."""
  return {k: tuple(np.shape(v)) for k, v in flatten(tree).items()}


def to_json(value: Any) -> Any:
  """`value` as it reads back from JSON: tuples become lists, numpy scalars numbers.

  Raises:
    TypeError: a value JSON cannot hold (an array, an object).
  """
  def convert(x):
    if isinstance(x, Mapping):
      return {str(k): convert(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [convert(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray, jax.Array)) and np.ndim(x) == 0:
      return np.asarray(x).item()
    return x

  converted = convert(value)
  return json.loads(json.dumps(converted))
