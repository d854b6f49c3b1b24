"""Images per second of a fine-tuning step on one GPU: tlflax (real and synthetic data) and PyTorch.

On a GPU node (JAX's CUDA 13 build matches the CUDA 13 torch that
constraints.txt pins; it needs an NVIDIA driver for CUDA 13; see the README's
"GPUs, TPUs and clusters"):

    python3 -m venv .venv && .venv/bin/pip install -e ".[cuda13,test]" -c constraints.txt
    .venv/bin/python benchmarks/gpu_throughput.py                  # ResNet-50, 224 px, batch 256
    .venv/bin/python benchmarks/gpu_throughput.py --folder /data/imagenet/train --batch-size 128
    .venv/bin/python benchmarks/gpu_throughput.py --tiny           # CPU smoke run: ResNet-18, 32 px

On the first device only (PyTorch uses one GPU), `--model` (resnet50)
computing in bfloat16 (parameters float32), `--batch-size` images of
`--image-size` px a step, SGD with momentum 0.9 or AdamW (`--optimizer`), two
steps: full fine-tuning (every parameter trained) and head only (the linear
probe: all but `head` frozen, frozen BatchNorm layers in inference mode).
Each with two kinds of data:

* real: JPEGs from `--folder` (class sub-folders) or `--images` generated at
  ImageNet-like size (about 500x375, quality 90), through `tlflax.data.build`
  (random-resized-crop + flip, batches made by `--workers` Grain worker
  processes, default every core) and `tlflax.sharding.prefetch_to_mesh`
  (2 batches ahead), as `tlflax.training` feeds its steps;
* synthetic: one random batch already on the device, used for every step.

tlflax's step is `tlflax.steps.make_train_step`, jitted as the training loop
jits it (shardings, donated state), uint8 images normalised inside it.
PyTorch's is torchvision's model of the same name (where there is one),
channels-last, bfloat16 autocast, `torch.compile` (`--no-torch-compile`:
eager), `zero_grad`, backward and the same optimizer (fused on CUDA); head
only sets `requires_grad=False` on the backbone and eval mode, so BatchNorm
statistics stay. It too normalises uint8 batches on the device: synthetic
ones already there, real ones from a `DataLoader` on the same folder
(`RandomResizedCrop` + flip on PIL images, `--workers` workers, pinned
memory). JAX gets 45% of the GPU's memory (`XLA_PYTHON_CLIENT_MEM_FRACTION`,
unless set), PyTorch, measured after it in the same process, the rest.

Every number: `--warmup` untimed steps (compilation, autotuning; with real
data at least one batch per worker, so every worker has started), then
`--windows` windows of `--steps` steps, each timed from its first dispatch
until the last step's outputs are ready (`jax.block_until_ready`,
`torch.cuda.synchronize`); the median window counts. Nothing asserts a
time: the ratios compare measurements of the same call. The columns:

* images/s: batch size x steps / seconds of the median window; ms/step:
  its time per step; windows: the slowest and the fastest window;
* GFLOP/step: XLA's cost analysis of tlflax's compiled step (forward,
  backward, update); the PyTorch rows use the same count (same network,
  same batch);
* TFLOP/s: GFLOP/step x steps/s; % of peak: that over the device's dense
  bfloat16 peak (`PEAK_BF16_TFLOPS`, or `--peak-tflops`; "unknown" on a CPU);
* real / synthetic: real-data images/s over synthetic, same framework and
  step (1.0: the input pipeline keeps the device busy; target >= 0.9);
* tlflax / torch: tlflax's images/s over PyTorch's, same step and data.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.utils.data
import torchvision
from torchvision import transforms as tv

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from tlflax import data, defaults, freeze, models, optim, sharding, steps
from tlflax.data import images as image_files
from tlflax.data import pipeline

# Dense (no sparsity) bfloat16 tensor-core TFLOP/s per GPU, by device kind,
# from NVIDIA's datasheets (which print twice these with sparsity). First
# match wins: the PCIe and NVL boards before the SXM ones.
PEAK_BF16_TFLOPS = (
    (r"H100 PCIe", 756.0),
    (r"H100 NVL|H200 NVL", 835.0),
    (r"H100|H200", 989.0),
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
)
PEAK_SOURCE = "NVIDIA datasheet, dense bf16"
STEP_KINDS = (("full fine-tuning", "none"), ("head only", "linear_probe"))
OPTIMIZERS = {"sgd": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9,
                      "schedule": "constant"},
              "adamw": {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.0,
                        "schedule": "constant"}}
TINY = dict(model="resnet18", image_size=32, batch_size=8, steps=3, windows=2, warmup=1,
            images=16, torch_compile=False)
FULL = dict(model="resnet50", image_size=224, batch_size=256, steps=20, windows=3, warmup=5,
            images=512, torch_compile=True)


def generate_jpegs(root: str, count: int, seed: int = 0) -> str:
  """`count` JPEGs of about 500x375 (both orientations), quality 90, in two class folders.

  Made as benchmarks/input_pipeline.py makes its own, on every core
  (numpy's generators and PIL's encoder release the GIL).

  Args:
    root: the folder to write (`root/class0`, `root/class1`).
    count: how many images.
    seed: with the image's index, decides its pixels.

  Returns:
    `root`.
  """
  def write(index):
    rng = np.random.default_rng([seed, index])
    folder = os.path.join(root, f"class{index % 2}")
    width, height = (500, 375) if index % 3 else (375, 500)
    # Smooth structure plus noise: compresses like a photo, not like flat colour.
    y, x = np.mgrid[0:height, 0:width]
    base = (np.sin(x / rng.uniform(8, 40)) + np.cos(y / rng.uniform(8, 40))) * 60 + 128
    pixels = base[..., None] + rng.normal(0, 20, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f"{index:05d}.jpg"), quality=90)

  for label in range(min(count, 2)):
    os.makedirs(os.path.join(root, f"class{label}"), exist_ok=True)
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as workers:
    list(workers.map(write, range(count)))
  return root


def peak_tflops(device_kind: str, override: float | None) -> float | None:
  """The device's dense bfloat16 peak in TFLOP/s, or None where unknown (a CPU)."""
  if override:
    return override
  for pattern, peak in PEAK_BF16_TFLOPS:
    if re.search(pattern, device_kind):
      return peak
  return None


def time_windows(run_step, finish, warmup: int, steps_per_window: int,
                 windows: int) -> list[float]:
  """Seconds of each window of `steps_per_window` calls of `run_step`, after `warmup` calls.

  `finish()` waits until the last step's outputs are ready; it ends the
  warm-up and every window, so no window inherits queued work.
  """
  for _ in range(warmup):
    run_step()
  finish()
  seconds = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps_per_window):
      run_step()
    finish()
    seconds.append(time.perf_counter() - start)
  return seconds


def measured(framework: str, step: str, data_kind: str, seconds: list[float],
             args) -> dict:
  """A table row from the seconds of each timed window."""
  per_window = [args.batch_size * args.steps / s for s in seconds]
  median = statistics.median(seconds)
  return {"framework": framework, "step": step, "data": data_kind,
          "images_per_second": args.batch_size * args.steps / median,
          "ms_per_step": 1e3 * median / args.steps,
          "window_images_per_second": (min(per_window), max(per_window))}


def folder_config(root: str, image_size: int, engine: str = "pil"):
  """`config.data` for the image folder `root` (class sub-folders), augmented for training."""
  config = defaults.base_config().data
  config.engine = engine
  config.source, config.path = "folder", root
  config.train_split = config.eval_split = "."
  config.image_size = image_size
  config.resize_size = round(image_size * 256 / 224)
  config.augment = "random_resized_crop"
  return config


def one_device_mesh() -> jax.sharding.Mesh:
  """A mesh of the first device, with tlflax's axis: one GPU, as PyTorch uses."""
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), (sharding.DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def random_variables(model, image_size: int) -> dict:
  """Variables of the model's shapes, drawn on the host with numpy.

  The values do not change the speed (only their shapes do), and compiling
  the model's initialisers takes longer than a `--tiny` run's steps. Kernels
  are He-scaled normals, BatchNorm scales and variances ones, the rest zeros.
  On the host, every train state made from them gets device buffers of its
  own to donate.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_in)).astype(leaf.dtype)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def step_flops(lowered, compiled) -> tuple[float, str]:
  """FLOPs of one step from XLA's cost analysis, and which analysis gave them.

  The compiled (optimised) module's count is the one asked for; the count
  before optimisation stands in if a backend reports none for its kernels.
  """
  def flops(analysis):
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float((analysis or {}).get("flops", 0.0))

  after, before = flops(compiled.cost_analysis()), flops(lowered.cost_analysis())
  if after >= 0.5 * before:
    return after, "compiled step"
  return before, f"step before optimisation (the compiled one reports {after / 1e9:.1f} GFLOP)"


def measure_tlflax(args, root: str, num_classes: int, workers: int) -> tuple[list, dict, list]:
  """tlflax rows, FLOPs per step kind, and notes on how they were made."""
  mesh = one_device_mesh()
  replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  dataset = data.build(folder_config(root, args.image_size, args.engine), "train",
                       training=True, global_batch_size=args.batch_size, num_workers=workers)
  model = models.get_model(args.model, num_classes=num_classes, dtype="bfloat16")
  size = args.image_size
  variables = random_variables(model, size)
  rng = np.random.default_rng(0)
  synthetic = sharding.to_global(
      {"image": rng.integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8),
       "label": rng.integers(0, num_classes, (args.batch_size,), dtype=np.int32)}, mesh)
  timed_steps = args.windows * args.steps
  longest = (max(args.warmup, dataset.num_workers) + timed_steps) * dataset.local_batch_size
  in_processes = (args.engine == "pil" and dataset.num_workers > 0
                  and longest >= pipeline.MIN_IMAGES_FOR_PROCESSES)
  # Each Grain worker makes whole batches, in turn: once every worker has
  # delivered one, all of them have started, and timing may begin.
  real_warmup = max(args.warmup, dataset.num_workers if in_processes else 1)
  total_steps = real_warmup + timed_steps
  if args.engine != "pil":
    made_by = (f"NVIDIA DALI (data.engine={args.engine!r}: JPEG decoding "
               f"{'on the GPU' if args.engine == 'dali' else 'on the CPU'}), "
               f"{dataset.num_threads} CPU thread(s)")
  elif in_processes:
    made_by = f"{dataset.num_workers} Grain worker processes"
  else:
    made_by = (f"{dataset.num_threads} thread(s) (a stream under "
               f"{pipeline.MIN_IMAGES_FOR_PROCESSES} images uses no worker processes)")
  notes = [f"tlflax real data: {dataset.num_examples} images, batches made by {made_by}"
           + f", {real_warmup} warm-up steps"]
  rows, flops = [], {}
  for step_name, spec in STEP_KINDS:
    freezing = freeze.compile_rules(freeze.rules_from_spec(spec, model.stage_names),
                                    variables["params"])
    tx = optim.make_optimizer(OPTIMIZERS[args.optimizer], freezing, total_steps)
    state = sharding.replicate(steps.create_train_state(variables, tx, freezing), mesh)
    jitted = jax.jit(steps.make_train_step(model, tx, freezing,
                                           prepare_images=dataset.device_transform()),
                     in_shardings=(replicated, batch_sharded),
                     out_shardings=(replicated, replicated), donate_argnums=0)
    lowered = jitted.lower(state, synthetic)
    compiled = lowered.compile()  # timed below without its compilation
    flops[step_name], source = step_flops(lowered, compiled)
    notes.append(f"{step_name}: {flops[step_name] / 1e9:.1f} GFLOP per step from XLA's cost "
                 f"analysis of the {source}")
    holder = {"state": state}

    def run(batch, holder=holder, compiled=compiled):
      holder["state"], holder["metrics"] = compiled(holder["state"], batch)

    def finish(holder=holder):
      jax.block_until_ready((holder["state"], holder["metrics"]))

    seconds = time_windows(lambda: run(synthetic), finish, args.warmup, args.steps,
                           args.windows)
    synthetic_row = measured("tlflax", step_name, "synthetic", seconds, args)
    stream = dataset.stream(0, total_steps)
    batches = sharding.prefetch_to_mesh(stream, mesh, size=2)
    try:
      seconds = time_windows(lambda: run(next(batches)), finish, real_warmup, args.steps,
                             args.windows)
    finally:
      batches.close()
      stream.close()
    rows += [measured("tlflax", step_name, "real", seconds, args), synthetic_row]
    del holder, state  # the device memory goes back before the next step kind
  return rows, flops, notes


class TorchNetwork(torch.nn.Module):
  """uint8 NCHW pixels -> normalised float32, channels-last -> a torchvision network."""

  def __init__(self, network: torch.nn.Module, mean, std):
    super().__init__()
    self.network = network
    self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
    self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

  def forward(self, pixels):
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    return self.network((pixels.float() / 255 - self.mean) / self.std)


def torch_head(network: torch.nn.Module) -> torch.nn.Module:
  """The classifier: the network's last Linear layer (`fc` of a ResNet)."""
  return [m for m in network.modules() if isinstance(m, torch.nn.Linear)][-1]


def torch_optimizer(name: str, parameters, fused: bool):
  config = OPTIMIZERS[name]
  if name == "sgd":
    return torch.optim.SGD(parameters, lr=config["learning_rate"], momentum=config["momentum"],
                           fused=fused or None)
  return torch.optim.AdamW(parameters, lr=config["learning_rate"],
                           weight_decay=config["weight_decay"], fused=fused or None)


def measure_torch(args, root: str, num_classes: int, workers: int,
                  jax_platform: str) -> tuple[list, list]:
  """PyTorch rows and notes on how they were made.

  No rows where torchvision has no model of this name, or where PyTorch and
  JAX do not both see a GPU (their numbers would not compare).
  """
  if not hasattr(torchvision.models, args.model):
    return [], [f"torch: torchvision has no {args.model!r}, so no PyTorch rows"]
  on_gpu = torch.cuda.is_available()
  if on_gpu != (jax_platform == "gpu"):
    return [], [f"torch: no PyTorch rows: JAX runs on {jax_platform}, while PyTorch "
                f"{'sees' if on_gpu else 'sees no'} CUDA GPU (check both installs: "
                "`torch.cuda.is_available()`, `jax.devices()`)"]
  device = torch.device("cuda" if on_gpu else "cpu")
  torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
  # What tlflax's side uses with data.mean / data.std unset and no weights: ImageNet's.
  mean, std = image_files.IMAGENET_MEAN, image_files.IMAGENET_STD
  size = args.image_size
  synthetic = (torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8,
                             device=device),
               torch.randint(0, num_classes, (args.batch_size,), device=device))
  transform = tv.Compose([tv.RandomResizedCrop(size), tv.RandomHorizontalFlip(),
                          tv.PILToTensor()])
  loader = torch.utils.data.DataLoader(
      torchvision.datasets.ImageFolder(root, transform), batch_size=args.batch_size,
      shuffle=True, drop_last=True, num_workers=workers, pin_memory=on_gpu,
      persistent_workers=True)
  if len(loader) == 0:
    raise ValueError(f"{root} has fewer images than one batch of {args.batch_size}.")

  def endless_batches():
    while True:
      yield from loader

  rows = []
  for step_name, _ in STEP_KINDS:
    network = getattr(torchvision.models, args.model)(num_classes=num_classes)
    model = TorchNetwork(network, mean, std).to(device, memory_format=torch.channels_last)
    if step_name == "head only":
      model.requires_grad_(False)
      torch_head(network).requires_grad_(True)
      model.eval()  # frozen BatchNorm statistics stay as they are
    else:
      model.train()
    forward = torch.compile(model) if args.torch_compile else model
    optimizer = torch_optimizer(args.optimizer,
                                [p for p in model.parameters() if p.requires_grad], on_gpu)

    def run(pixels, labels, forward=forward, optimizer=optimizer):
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = forward(pixels)
      torch.nn.functional.cross_entropy(logits.float(), labels).backward()
      optimizer.step()

    def finish():
      if on_gpu:
        torch.cuda.synchronize()

    def run_real(batches=endless_batches()):
      pixels, labels = next(batches)
      run(pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True))

    seconds = time_windows(lambda: run(*synthetic), finish, args.warmup, args.steps,
                           args.windows)
    synthetic_row = measured("torch", step_name, "synthetic", seconds, args)
    with warnings.catch_warnings():
      # The DataLoader forks its workers at the first batch, and JAX warns at
      # every fork of a process it runs threads in. The workers only decode
      # and crop images (PIL, torch on the CPU); they never call JAX.
      warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                              category=RuntimeWarning)
      # One batch from every worker first, as for tlflax's real data.
      seconds = time_windows(run_real, finish, max(args.warmup, workers), args.steps,
                             args.windows)
    rows += [measured("torch", step_name, "real", seconds, args), synthetic_row]
  notes = [f"torch {torch.__version__} on {device.type}: torch.compile "
           f"{'on' if args.torch_compile else 'off'}; DataLoader with {workers} workers, "
           f"{max(args.warmup, workers)} warm-up steps"]
  return rows, notes


def add_ratios(rows: list[dict], flops: dict, peak: float | None) -> None:
  """Fills in TFLOP/s, the share of the peak and the two ratios of every row."""
  by_key = {(r["framework"], r["step"], r["data"]): r for r in rows}
  for row in rows:
    row["gflop_per_step"] = flops[row["step"]] / 1e9
    row["tflops"] = flops[row["step"]] / (row["ms_per_step"] / 1e3) / 1e12
    row["peak_fraction"] = row["tflops"] / peak if peak else None
    synthetic = by_key.get((row["framework"], row["step"], "synthetic"))
    row["real_over_synthetic"] = (row["images_per_second"] / synthetic["images_per_second"]
                                  if row["data"] == "real" else None)
    torch_row = by_key.get(("torch", row["step"], row["data"]))
    row["tlflax_over_torch"] = (row["images_per_second"] / torch_row["images_per_second"]
                                if row["framework"] == "tlflax" and torch_row else None)


def table(rows: list[dict]) -> str:
  lines = ["| framework | step | data | images/s | ms/step | windows (images/s) | GFLOP/step "
           "| TFLOP/s | % of peak | real / synthetic | tlflax / torch |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    slowest, fastest = row["window_images_per_second"]
    optional = [f"{100 * row['peak_fraction']:.1f}" if row["peak_fraction"] is not None
                else "unknown"]
    optional += [f"{row[k]:.2f}" if row[k] is not None else "-"
                 for k in ("real_over_synthetic", "tlflax_over_torch")]
    lines.append(f"| {row['framework']} | {row['step']} | {row['data']} | "
                 f"{row['images_per_second']:.0f} | {row['ms_per_step']:.1f} | "
                 f"{slowest:.0f}-{fastest:.0f} | {row['gflop_per_step']:.3g} | "
                 f"{row['tflops']:.3g} | " + " | ".join(optional) + " |")
  for row in rows:
    if row["framework"] == "tlflax" and row["data"] == "real":
      verdict = "met" if row["real_over_synthetic"] >= 0.9 else "not met"
      lines.append(f"tlflax {row['step']}: real / synthetic = {row['real_over_synthetic']:.2f} "
                   f"(target >= 0.9: {verdict})")
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true",
                      help="CPU smoke run: " + ", ".join(f"{k}={v}" for k, v in TINY.items()))
  parser.add_argument("--model", help=f"a tlflax model name (default {FULL['model']})")
  parser.add_argument("--image-size", type=int, help=f"default {FULL['image_size']}")
  parser.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']}")
  parser.add_argument("--steps", type=int, help=f"steps per timed window "
                      f"(default {FULL['steps']})")
  parser.add_argument("--windows", type=int, help=f"timed windows (default {FULL['windows']})")
  parser.add_argument("--warmup", type=int, help=f"untimed steps first (default "
                      f"{FULL['warmup']})")
  parser.add_argument("--images", type=int, help=f"JPEGs to generate (default "
                      f"{FULL['images']})")
  parser.add_argument("--folder", help="an image folder (one sub-folder per class) instead "
                      "of generated JPEGs")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="Grain and DataLoader worker processes (default: every core)")
  parser.add_argument("--engine", choices=("pil", "dali", "dali_cpu"), default="pil",
                      help="who decodes tlflax's real batches (config.data.engine): Grain "
                           "workers with PIL, or NVIDIA DALI on the GPU / the CPU")
  parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
  parser.add_argument("--torch-compile", action=argparse.BooleanOptionalAction,
                      help="torch.compile the PyTorch model (default: on, off with --tiny)")
  parser.add_argument("--peak-tflops", type=float,
                      help="the device's bf16 peak, where the table has no entry for it")
  args = parser.parse_args(argv)
  for key, value in (TINY if args.tiny else FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  for key in ("image_size", "batch_size", "steps", "windows", "workers", "images"):
    if getattr(args, key) < 1:
      parser.error(f"--{key.replace('_', '-')} must be at least 1.")
  if args.warmup < 1:
    parser.error("--warmup must be at least 1 (the first step is never timed).")
  if args.model not in models.model_names():
    parser.error(f"--model {args.model}: unknown; use one of {', '.join(models.model_names())}.")
  if args.folder and not os.path.isdir(args.folder):
    parser.error(f"--folder {args.folder}: no such folder.")
  if args.peak_tflops is not None and args.peak_tflops <= 0:
    parser.error("--peak-tflops must be positive.")
  return args


def main(argv=None) -> list[dict]:
  """Runs every measurement, prints the table, and returns its rows."""
  # JAX takes 75% of a GPU's memory when it starts; PyTorch runs after it, in
  # this process, and needs the rest.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  args = parse_args(argv)
  device = jax.devices()[0]
  peak = peak_tflops(device.device_kind, args.peak_tflops)
  with tempfile.TemporaryDirectory() as scratch:
    root = args.folder or generate_jpegs(os.path.join(scratch, "jpegs"), args.images)
    num_classes = max(1000, len(torchvision.datasets.folder.find_classes(root)[0]))
    tlflax_rows, flops, notes = measure_tlflax(args, root, num_classes, args.workers)
    torch_rows, torch_notes = measure_torch(args, root, num_classes, args.workers,
                                            device.platform)
  rows = tlflax_rows + torch_rows
  add_ratios(rows, flops, peak)
  peak_text = (f"peak {peak:.0f} TFLOP/s ({'--peak-tflops' if args.peak_tflops else PEAK_SOURCE})"
               if peak else "peak unknown")
  print(f"\n## {args.model}, {args.image_size} px, batch {args.batch_size}, bfloat16, "
        f"{args.optimizer}; {device.device_kind} ({device.platform}, the first of "
        f"{jax.device_count()}), {peak_text}; "
        f"{os.cpu_count()} cores; median of {args.windows} windows of {args.steps} steps "
        f"after {args.warmup}\n")
  print(table(rows))
  print("\n" + "\n".join(notes + torch_notes))
  return rows


if __name__ == "__main__":
  main()
