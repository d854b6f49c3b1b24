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
