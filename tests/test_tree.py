"""Trees as flat dicts (tree.py): exact paths, round trips, differences, JSON values."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tlflax import tree

VARIABLES = {
    "params": {"stem": {"conv": {"kernel": np.ones((3, 3, 3, 16), np.float32)}},
               "head": {"kernel": np.zeros((64, 10), np.float32),
                        "bias": np.zeros((10,), np.float32)}},
    "batch_stats": {"stem": {"bn": {"mean": np.zeros((16,), np.float32)}}},
}


def test_flatten_joins_paths_with_slashes_and_unflatten_inverts_it():
  flat = tree.flatten(VARIABLES)
  assert flat == {
      "params/stem/conv/kernel": VARIABLES["params"]["stem"]["conv"]["kernel"],
      "params/head/kernel": VARIABLES["params"]["head"]["kernel"],
      "params/head/bias": VARIABLES["params"]["head"]["bias"],
      "batch_stats/stem/bn/mean": VARIABLES["batch_stats"]["stem"]["bn"]["mean"],
  }
  # The leaves themselves, not copies.
  assert flat["params/head/kernel"] is VARIABLES["params"]["head"]["kernel"]
  assert tree.unflatten(flat) == VARIABLES
  assert tree.flatten(tree.unflatten(flat)) == flat


def test_flatten_takes_frozen_dicts_and_returns_plain_dicts():
  frozen = flax.core.freeze({"params": {"head": {"bias": 1.0}}})
  flat = tree.flatten(frozen)
  assert flat == {"params/head/bias": 1.0} and type(flat) is dict
  unflat = tree.unflatten(flat)
  assert unflat == {"params": {"head": {"bias": 1.0}}} and type(unflat["params"]) is dict


def test_empty_subtrees_do_not_survive_a_round_trip():
  # A model without BatchNorm has batch_stats == {}: flat, it has no entry.
  assert tree.flatten({"params": {"w": 1}, "batch_stats": {}}) == {"params/w": 1}
  assert tree.unflatten({"params/w": 1}) == {"params": {"w": 1}}
  assert tree.flatten({}) == {} and tree.unflatten({}) == {}


def test_flatten_dotted_joins_config_keys_with_dots():
  nested = {"seed": 0, "optimizer": {"learning_rate": 0.1, "schedule": {"name": "cosine"}},
            "data": {"mean": (0.5, 0.5)}}
  assert tree.flatten_dotted(nested) == {"seed": 0, "optimizer.learning_rate": 0.1,
                                         "optimizer.schedule.name": "cosine",
                                         "data.mean": (0.5, 0.5)}
  assert tree.flatten_dotted({"a": {"b": 1}}, prefix="config.") == {"config.a.b": 1}
  assert tree.flatten_dotted({}) == {}


def test_path_string_and_leaves_with_paths_for_any_pytree():
  ((key_path, leaf),), _ = jax.tree_util.tree_flatten_with_path({"a": [{"b": 5}]})
  assert tree.path_string(key_path) == "a/0/b" and leaf == 5
  assert tree.leaves_with_paths({"b": {"c": 4}, "a": [1, (2, 3)]}) == {
      "a/0": 1, "a/1/0": 2, "a/1/1": 3, "b/c": 4}
  # Named tuples (optax states) are addressed by their field names.
  state = optax.ScaleByAdamState(count=np.int32(3), mu={"w": 1.0}, nu={"w": 2.0})
  assert tree.leaves_with_paths(state) == {"count": np.int32(3), "mu/w": 1.0, "nu/w": 2.0}
  assert tree.leaves_with_paths({}) == {}


def test_params_first_orders_params_then_batch_stats_then_the_rest():
  keys = ["opt_state/mu/w", "batch_stats/b", "step", "params/z", "params/a", "batch_stats/a"]
  assert tree.params_first(keys) == ["params/a", "params/z", "batch_stats/a", "batch_stats/b",
                                     "opt_state/mu/w", "step"]
  assert tree.params_first(iter(["b", "a"])) == ["a", "b"]  # any iterable
  # "paramsx" is not the params collection.
  assert tree.params_first(["paramsx/a", "params/b"]) == ["params/b", "paramsx/a"]


def test_differences_lists_only_in_each_and_changed_params_first():
  have = {"params/a": (3,), "params/b": (1,), "batch_stats/m": (2,), "step": (),
          "params/same": (4,)}
  want = {"params/a": (4,), "batch_stats/m": (5,), "opt_state/x": (1,), "params/same": (4,),
          "params/new": (2,)}
  assert tree.differences(have, want) == (["params/b", "step"], ["params/new", "opt_state/x"],
                                          ["params/a", "batch_stats/m"])
  assert tree.differences(want, want) == ([], [], [])
  # The docstring's example.
  assert tree.differences({"params/a": (3,), "params/b": (1,)}, {"params/a": (4,)}) == (
      ["params/b"], [], ["params/a"])


def test_listing_counts_and_shortens():
  assert tree.listing("missing from the file", ["a", "b"]) == "  2 missing from the file: a, b"
  keys = [f"k{i}" for i in range(10)]
  assert tree.listing("extra", keys, limit=3) == "  10 extra: k0, k1, k2 ..."
  assert tree.listing("extra", keys[:3], limit=3) == "  3 extra: k0, k1, k2"
  assert tree.listing("extra", []) == "  0 extra: "


def test_shapes_of_arrays_and_shape_structs():
  assert tree.shapes(VARIABLES) == {"params/stem/conv/kernel": (3, 3, 3, 16),
                                    "params/head/kernel": (64, 10), "params/head/bias": (10,),
                                    "batch_stats/stem/bn/mean": (16,)}
  traced = jax.eval_shape(lambda: {"params": {"w": jnp.zeros((2, 3)), "s": jnp.zeros(())}})
  assert tree.shapes(traced) == {"params/w": (2, 3), "params/s": ()}


def test_to_json_is_what_json_reads_back():
  value = {"shape": (1, 2), "nested": [(3,), {"x": np.float32(0.5)}], 7: np.int64(3),
           "flag": np.bool_(True), "zero_d": np.array(2.5), "jax": jnp.asarray(4, jnp.int32),
           "text": "a", "none": None}
  converted = tree.to_json(value)
  assert converted == {"shape": [1, 2], "nested": [[3], {"x": 0.5}], "7": 3, "flag": True,
                       "zero_d": 2.5, "jax": 4, "text": "a", "none": None}
  # Plain Python types, exactly as json.loads returns them.
  assert type(converted["7"]) is int and type(converted["nested"][1]["x"]) is float
  assert type(converted["flag"]) is bool and type(converted["jax"]) is int
  assert converted == json.loads(json.dumps(converted))
  assert tree.to_json(converted) == converted


@pytest.mark.parametrize("bad", [np.zeros(3), jnp.ones((2,)), object(), {"a": [np.zeros((1,))]}])
def test_to_json_refuses_what_json_cannot_hold(bad):
  with pytest.raises(TypeError, match="not JSON serializable"):
    tree.to_json(bad)
