"""Shared test set-up. The environment lines must run before JAX or Keras start."""

import atexit
import os
import shutil
import tempfile


def with_device_count(xla_flags: str, count: int) -> str:
  """`xla_flags` with the host device count set to `count`, every other flag kept.

  A user's own flags (e.g. `--xla_cpu_max_isa=SSE4_2`, or a cluster's
  defaults) must survive: add to them, never replace them.
  """
  kept = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


# Eight CPU devices, so sharding tests run anywhere; Keras references run on JAX.
os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), 8)
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiled programs go to a cache of this session alone (removed at its end),
# not the user's ~/.cache/tlflax/xla: every run of the suite starts cold.
_SESSION_XLA_CACHE = tempfile.mkdtemp(prefix="tlflax-tests-xla-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_XLA_CACHE
atexit.register(shutil.rmtree, _SESSION_XLA_CACHE, ignore_errors=True)

import importlib.util  # pylint: disable=wrong-import-position
import pathlib  # pylint: disable=wrong-import-position

# torchvision (and its triton) crashes the process when it is imported after
# TensorFlow, so the references are imported before any test can load TF,
# whichever test files run and in whatever order.
if importlib.util.find_spec("torchvision") is not None:
  import torch  # pylint: disable=wrong-import-position,unused-import
  import torchvision  # pylint: disable=wrong-import-position,unused-import

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


def by_run_set(names, default=(), slow=()):
  """`names` as parameters of one test, each marked with the run set it belongs to.

  Names in `default` run in the README test command, those in `slow` in
  `pytest -m slow` (CI runs both). Every other name is a further size of a
  family the first two sets already cover, built by the same code from other
  depths and widths: it runs in `pytest -m every_size` (the parity table's
  run, see the README), which CI leaves out for time.
  """
  def marks(name):
    if name in default:
      return ()
    return (pytest.mark.slow,) if name in slow else (pytest.mark.every_size,)
  unknown = (set(default) | set(slow)) - set(names)
  assert not unknown, f"not among the names: {sorted(unknown)}"
  return [pytest.param(name, marks=marks(name)) for name in names]


def metric_lines(workdir) -> dict:
  """A run's metrics.jsonl as {(step, split): line}."""
  from tlflax.training import metrics
  return {(m["step"], m["split"]): m for m in metrics.read_metrics(str(workdir))}


def relative_error(actual, expected) -> float:
  """max |actual - expected| relative to the reference output's scale."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))


# Bounds for comparing a float32 model with a reference (the reasons, once).
#
# * Inference (running statistics) is well conditioned: float32 outputs of a
#   correct conversion sit within a few 1e-6 of the reference on every CPU
#   setting we tried (AVX-512, SSE4.2 only, one core). 1e-4 of the output
#   scale is 20-100x that, while a mistake in the conversion (a transposed
#   kernel, a wrong padding, eps or statistic) moves outputs by 1e-3 or more.
INFERENCE_TOLERANCE = 1e-4
# * Exact mathematics, both sides in float64: the unit roundoff 1.1e-16 times
#   the network's amplification of rounding (at most ~4e5, seen as
#   float32 error / 2^-24 for a random ResNet-152 in training mode) gives
#   ~5e-11 at worst; 1e-9 leaves 20x, and any real difference in the
#   computation (BatchNorm eps 1e-5 vs 1e-3, biased vs unbiased variance)
#   shows at 1e-6 or more.
FLOAT64_TOLERANCE = 1e-9
# * Training mode (batch statistics) in float32: a deep random network
#   normalised by the statistics of four examples is ill conditioned, and
#   any float32 implementation of it lands conditioning x rounding away from
#   the exact result (PyTorch's own float32 ResNet-152 is 2e-2 away). Two
#   correct implementations differ in the constant (summation order and
#   blocking, which change with the CPU's vector width and thread count; the
#   variance formula), not in the order of magnitude: measured over 17
#   networks under three CPU settings, ours / PyTorch's error is 0.5-2.3.
#   One batch's error is a heavy-tailed sample, though: EfficientNetV2-S at
#   32 px normalises 4 numbers per channel in its last stages, and over four
#   batches the ratio was 0.97, 1.0, 1.5 and 4.5 on one machine (5.7 for the
#   4.5 batch on another, where PyTorch rounded luckier). So the check takes
#   the median error over three batches on each side (1.5 there) and asks
#   that ours be at most 4x the reference's own float32 error, measured in
#   the same run on the same machine (floor: the inference tolerance).
#   Exactness itself is the float64 check's job.
FLOAT32_TRAIN_FACTOR = 4.0


def float32_train_bound(reference_float32_error: float) -> float:
  """The bound for a float32 training-mode output (see FLOAT32_TRAIN_FACTOR)."""
  return max(INFERENCE_TOLERANCE, FLOAT32_TRAIN_FACTOR * reference_float32_error)


def float32_conditioning(model, variables, images) -> float:
  """How far float32 rounding alone moves `model`'s training-mode output.

  Runs the same network in float64 and returns the relative difference: the
  float32 error of our own implementation on this machine, the reference
  error for `float32_train_bound` where the reference framework cannot run
  in float64 (Keras).
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


def report_parity(name: str, library: str, **figures) -> None:
  """Prints one parity test's figures, and logs them for `experiments/parity_table.py`.

  Args:
    name: the tlflax model name.
    library: the reference it was compared with ("torchvision", "timm", "keras").
    **figures: relative errors and bounds (inference32, inference64, train32,
      train32_bound, train64); a test reports those it measures.

  With TLFLAX_PARITY_LOG=FILE set, one JSON line is appended to FILE, so a run
  of the parity tests (`pytest -m "slow or not slow" -k parity`) leaves the
  table of every name; unset, nothing is written. Each line names the CPU
  setting it ran under (`cpu_setting`), so runs under imitated CPUs (.ci/run)
  can share one file.
  """
  import json  # pylint: disable=import-outside-toplevel
  print(f"\nPARITY {name} ({library}): " + ", ".join(
      f"{key} {value:.2e}" if isinstance(value, float) else f"{key} {value}"
      for key, value in figures.items()))
  log = os.environ.get("TLFLAX_PARITY_LOG")
  if log:
    with open(log, "a", encoding="utf-8") as f:
      record = {"name": name, "library": library, "cpu": cpu_setting(), **figures}
      f.write(json.dumps(record) + "\n")


def cpu_setting() -> str:
  """The imitated CPU this process runs as: "native", or the limits set (see .ci/run)."""
  limits = ["xla " + f.split("=", 1)[1] for f in os.environ.get("XLA_FLAGS", "").split()
            if f.startswith("--xla_cpu_max_isa=")]
  if os.environ.get("ATEN_CPU_CAPABILITY"):
    limits.append(f"aten {os.environ['ATEN_CPU_CAPABILITY']}")
  return ", ".join(limits) or "native"
