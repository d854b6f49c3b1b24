"""Frozen-prefix caching: epoch time per freeze depth, and a whole freezing-depth sweep.

    .venv/bin/python benchmarks/prefix_cache.py            # ResNet-18 at 64 px, ants vs bees
    .venv/bin/python benchmarks/prefix_cache.py --image_size 32 --epochs 2

Prints two tables, measured in one run on the same data:

1. Epoch time of a run with the stem and the first k stages frozen, through
   the training loop's own pieces (`tlflax.training.loop.build_stage`: data, jitted step),
   after a warm-up epoch: images through the whole network versus the cached
   stage-k outputs through the rest. k = 4 is everything but the head.
2. Total time of a 5-depth sweep (k = 0..4, `training.train_and_evaluate` each,
   compilation, evaluation and checkpoints included) done naively versus with
   the prefix cache shared by the sweep (each depth's cache is computed from
   the previous depth's, so the data goes through each stage once).

Targets: cached epochs at least 10x faster for k = all-but-head; the sweep at
most half the naive time. Reads ../shared/data/hymenoptera (or `--data`) when
present, else the offline digits.

Measured (ants vs bees, 245 training images, batch 32):

    | k   | 2 CPU cores, 64 px: images / cached | H100, 224 px: images / cached |
    |-----|-------------------------------------|-------------------------------|
    | 0   | 1.306 s / 0.891 s = 1.5x            | 0.601 s / 0.109 s = 5.5x      |
    | 1   | 0.924 s / 0.584 s = 1.6x            | 0.644 s / 0.095 s = 6.8x      |
    | 2   | 0.752 s / 0.387 s = 1.9x            | 0.652 s / 0.044 s = 14.9x     |
    | 3   | 0.547 s / 0.186 s = 2.9x            | 0.648 s / 0.023 s = 28.1x     |
    | 4   | 0.452 s / 0.004 s = 107x            | 0.667 s / 0.015 s = 43x       |
    | sweep (naive / shared caches) | 40.3 s / 30.2 s = 0.75 (3 epochs) | 159.8 s / 71.9 s = 0.45 (15 epochs) |

k = all-but-head meets the 10x target on both. The sweep meets "at most
half" on the GPU, where decoding and resizing the JPEGs bounds the naive
epoch, and misses it on the CPU: there the epochs are compute-bound, and at
k = 0-2 the cached run still back-propagates through most of the network, so
even with fixed costs (compilation, evaluation, checkpoints) amortised away
the epoch times alone give (0.891+0.584+0.387+0.186+0.004) / (1.306+0.924+
0.752+0.547+0.452) = 0.52.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # pylint: disable=wrong-import-position

from tlflax import defaults, sharding, steps, training  # pylint: disable=wrong-import-position
from tlflax.training import loop, metrics

HYMENOPTERA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                           "data", "hymenoptera")


def make_config(args, depth: int, cached: bool, cache_dir: str):
  config = defaults.base_config()
  config.model.name = args.model
  if os.path.isdir(args.data):
    config.data.source, config.data.path = "folder", os.path.abspath(args.data)
    config.data.train_split, config.data.eval_split = "train", "val"
  else:
    config.data.source, config.data.name = "digits", "target"
  config.data.image_size = config.data.resize_size = args.image_size
  config.data.augment = "none"  # deterministic preprocessing: what a cache needs
  config.batch_size, config.eval_batch_size = args.batch_size, 64
  config.num_epochs = float(args.epochs)
  config.freeze.rules = f"depth:{depth}"
  config.optimizer.learning_rate = 0.01
  config.log_every_steps = 1000
  config.prefix_cache.enabled = cached
  config.prefix_cache.directory = cache_dir
  return config


def epoch_seconds(config, workdir: str, repeats: int) -> float:
  """Seconds per training epoch (data + steps), after a warm-up epoch."""
  from tlflax.training import checkpoint
  with checkpoint.Checkpointer(workdir, keep=1) as ckpt:
    run = loop.setup(config, workdir, ckpt)
  mesh = sharding.make_mesh()
  stage = run.stages[0]
  current = loop.build_stage(config, run, stage, run.variables, mesh)
  state = sharding.replicate(
      steps.create_train_state(run.variables, current.tx, current.freezing), mesh)

  def one_epoch(state, epoch):
    for batch in current.train_data.batches(epoch=epoch):
      state, step_metrics = current.train_step(state, sharding.to_global(batch, mesh))
    jax.block_until_ready(step_metrics["loss"])
    return state

  state = one_epoch(state, 0)  # compiles
  times = []
  for epoch in range(1, repeats + 1):
    begin = time.perf_counter()
    state = one_epoch(state, epoch)
    times.append(time.perf_counter() - begin)
  return min(times)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--data", default=HYMENOPTERA,
                      help="image folder with train/ and val/ (else the offline digits)")
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=3, help="epochs per sweep point")
  parser.add_argument("--repeats", type=int, default=2, help="timed epochs (best is kept)")
  args = parser.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix="tlflax-prefix-bench-")
  data = args.data if os.path.isdir(args.data) else "digits 5-9"
  print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, {data}; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} CPU cores", flush=True)
  try:
    depths = range(5)
    rows = []
    for depth in depths:
      cache_dir = os.path.join(scratch, f"epoch-cache-{depth}")
      plain = epoch_seconds(make_config(args, depth, False, cache_dir),
                            os.path.join(scratch, f"plain{depth}"), args.repeats)
      cached = epoch_seconds(make_config(args, depth, True, cache_dir),
                             os.path.join(scratch, f"cached{depth}"), args.repeats)
      rows.append((depth, plain, cached))
      print(f"  depth {depth}: {plain:.3f} s vs {cached:.3f} s", flush=True)

    # Both sweeps run in this process: pay its one-time costs (TensorBoard's
    # import) before either is timed, so the first does not carry them.
    os.makedirs(os.path.join(scratch, "warm-up"))
    metrics.MetricsWriter(os.path.join(scratch, "warm-up")).close()
    sweep = {}
    for name, cached in (("naive", False), ("shared prefix cache", True)):
      cache_dir = os.path.join(scratch, "sweep-cache")
      begin = time.perf_counter()
      for depth in depths:
        training.train_and_evaluate(make_config(args, depth, cached, cache_dir),
                                 os.path.join(scratch, f"sweep-{cached}-{depth}"))
      sweep[name] = time.perf_counter() - begin
      print(f"  sweep {name}: {sweep[name]:.1f} s", flush=True)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)

  print("\nEpoch time with the stem and the first k stages frozen")
  print("| k (frozen stages) | images through the network (s) | cached stage-k outputs (s) "
        "| speed-up |")
  print("|---|---|---|---|")
  for depth, plain, cached in rows:
    label = f"{depth} (all but the head)" if depth == 4 else str(depth)
    print(f"| {label} | {plain:.3f} | {cached:.3f} | {plain / cached:.1f}x |")
  print(f"\nA {len(depths)}-depth sweep (k = 0..4, {args.epochs} epochs each, "
        "compilation and evaluation included)")
  print("| sweep | total (s) | vs naive |")
  print("|---|---|---|")
  for name, seconds in sweep.items():
    print(f"| {name} | {seconds:.1f} | {seconds / sweep['naive']:.2f} |")


if __name__ == "__main__":
  sys.exit(main())
