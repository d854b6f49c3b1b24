"""Shared test set-up. The environment lines must run before JAX or Keras start."""

import os

# Eight CPU devices, so sharding tests run anywhere; Keras references run on JAX.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # pylint: disable=wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

# Real data beside the repository (absent in a user's fresh clone).
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> pathlib.Path:
  """Path under ../shared/data, skipping the calling test when it is absent."""
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} is not available (only beside the development checkout)")
  return path


def relative_error(actual, expected) -> float:
  """max |actual - expected| relative to the reference output's scale."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))


def float32_conditioning(model, variables, images) -> float:
  """How far float32 rounding alone moves `model`'s training-mode output.

  Runs the same network in float64 and returns the relative difference. A deep
  random network normalised by batch statistics amplifies rounding (for a
  ResNet-152 about 5e-4, PyTorch's own float32 included), so train-mode
  parity bounds are max(1e-4, 1.5 x this). A wrong conversion still fails:
  it moves the output by O(1), not by rounding.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def run(dtype):
    cast = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
    out, _ = model.clone(dtype=dtype).apply(cast, jnp.asarray(images, dtype), train=True,
                                            mutable=["batch_stats"])
    return np.asarray(out, np.float64)

  float32 = run(jnp.float32)
  with jax.enable_x64(True):
    float64 = run(jnp.float64)
  return relative_error(float32, float64)
