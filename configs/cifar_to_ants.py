"""Real pretrained weights on a real target: CIFAR-10 ResNet-56 -> ants vs bees.

    .venv/bin/python -m tlflax.main --config configs/cifar_to_ants.py --workdir workdirs/cifar_to_ants

The CIFAR-10 ResNet-56 of `../shared/data/cifar10-resnets/` (real weights)
is transferred to the 245 ants-and-bees training images of
`../shared/data/hymenoptera/` (153 validation images), at 32x32 since the
weights are CIFAR ones. `get_config` fails, naming what is missing, when
these are not beside the repository; with them elsewhere, give their folder:
`--config configs/cifar_to_ants.py:/path/to/shared/data`. Six ways, each
from the pretrained weights and from random weights, over 3 seeds:

* linear probe (= freeze depth 3: stem and all three stages frozen);
* freeze depth 2, 1, 0 (the stem and the first k stages frozen, the rest
  and a new head trained);
* full fine-tuning;
* LP-FT: a linear probe stage, then fine-tuning everything at a lower rate
  (`tlflax.stages.lp_ft`), the same number of steps in all.

A sweep (see `tlflax.sweeps`) of 36 points, `<method>-<init>__seed-<s>` with
method probe, depth2, depth1, depth0, full or lp_ft and init pretrained or
random (e.g. `probe-pretrained__seed-0`, `lp_ft-random__seed-2`), each in
`workdirs/cifar_to_ants/<point>`; finished points are skipped when rerun.
results.md has one row per (method, init), named `<method>-<init>`, with
its accuracy as mean ± sample std over the seeds; `accuracy_by_group.png`
shows each row as one position, its mean ± sd and every seed as a dot. Preprocessing is deterministic
(resize + centre crop), so frozen runs train from the frozen-prefix cache, in
the default cache directory `$TLFLAX_CACHE_DIR/prefix`
(`~/.cache/tlflax/prefix`), shared with other runs (entries are keyed by the
prefix's weights and the data, so sharing is safe).

Settings: `SEEDS`, `EPOCHS` and `LEARNING_RATE` below; edit them, e.g.
`SEEDS = range(8)` for more seeds. The LP-FT points carry their own stage
lengths and rates, computed from `EPOCHS` and `LEARNING_RATE`, so
`--config.num_train_steps` or `--config.optimizer.learning_rate` would change
the other five methods but not LP-FT. On a cluster, `--list` prints one
command per point (no point depends on another), then `--collect` writes the
reports.

Measured on one machine (2-core AMD EPYC, default XLA kernels; 10 epochs =
70 steps of 32, SGD 0.03, validation accuracy %, mean ± sample std over
seeds 0-2; 36 runs in about 25 minutes on 2 CPU cores shared with other
jobs), as the rows of results.md: each line gives the `<method>-pretrained`
and `<method>-random` rows. The runs are those this config trains, measured
when they were a hand-written script (`experiments/cifar_to_ants.py`; this
config, rerun on the same machine, gave 60.1 for probe-pretrained__seed-0
and 67.3 for lp_ft-pretrained__seed-0, inside those rows' spread). The
last column is the gap over its standard error,
sqrt(s_pretrained^2 / 3 + s_random^2 / 3):

    | method (rows)    | <method>-pretrained | <method>-random | gap / s.e. |
    |------------------|---------------------|-----------------|------------|
    | probe            | 59.7 ± 0.8          | 50.3 ± 4.6      | 9.4 / 2.7  |
    | depth2           | 70.2 ± 0.4          | 61.0 ± 5.3      | 9.2 / 3.1  |
    | depth1           | 70.4 ± 2.5          | 59.9 ± 4.3      | 10.5 / 2.9 |
    | depth0           | 71.0 ± 1.4          | 57.5 ± 4.9      | 13.5 / 2.9 |
    | full             | 68.6 ± 2.8          | 64.1 ± 9.7      | 4.5 / 5.8  |
    | lp_ft            | 65.8 ± 2.6          | 53.4 ± 1.6      | 12.4 / 1.8 |

Float32 rounding differs between CPUs and 70 SGD steps amplify it, so
single runs move by a few points on another machine (random-init runs most);
read the table through its spread. The pretrained weights win by 3 standard
errors or more in five of the six methods (the probe, freezing depths 0-2,
LP-FT) and vary less across seeds; for full fine-tuning the 4.5-point gap is
within one standard error (random init ranges over 20 points), so three
seeds do not resolve it. Freezing the stem and zero to two stages is about
10 points above the bare linear probe (CIFAR-10's last-stage features are
too specific for ants and bees at 32x32) and level with full fine-tuning of
all 0.85 M parameters on 245 images, at less cost and variance. LP-FT, with
a third of the budget spent on the probe and the rest at a third of the
rate, trails full fine-tuning by about one spread: with 70 steps in all its
fine-tuning stage is short.
"""

import os

from tlflax import defaults, stages
from tlflax.sweeps import seeded

# ../shared/data beside the repository (this file is configs/cifar_to_ants.py).
SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                       "shared", "data"))
# Under the shared folder: the weights, and the images (train/ and val/, a folder per class).
WEIGHTS = os.path.join("cifar10-resnets", "resnet56-4bfd9763.th")
IMAGES = "hymenoptera"
SEEDS = (0, 1, 2)
EPOCHS = 10
LEARNING_RATE = 0.03
STEPS_PER_EPOCH = 245 // 32  # 245 training images, batches of 32 (the last, partial, dropped)
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH  # 70
PROBE_STEPS = TOTAL_STEPS // 3          # LP-FT: a third of the steps probing (23), ...
METHODS = {  # point names' method -> its overrides
    "probe": {"freeze.rules": "linear_probe"},
    "depth2": {"freeze.rules": "depth:2"},
    "depth1": {"freeze.rules": "depth:1"},
    "depth0": {"freeze.rules": "depth:0"},
    "full": {"freeze.rules": "none"},
    # ... then everything at a third of the rate (47 steps).
    "lp_ft": {"stages": stages.lp_ft(PROBE_STEPS, TOTAL_STEPS - PROBE_STEPS, LEARNING_RATE,
                                     LEARNING_RATE / 3, unit="steps", warmup_steps=5)},
}
RANDOM_INIT = {"init.weights": "", "init.source": ""}  # the base config is the pretrained start
SWEEP_X = "freeze.rules"
SWEEP_COLUMNS = ("freeze.rules", "init.weights")
SWEEP_TITLE = ("CIFAR-10 ResNet-56 -> ants vs bees (32x32), pretrained vs random init; "
               f"lp_ft rows: {PROBE_STEPS} steps of linear probe, then all layers at a third "
               "of the rate (their freeze.rules is not used)")


def get_config(shared_data: str = ""):
  """A pretrained run (init from the CIFAR-10 weights); the points override it.

  Args:
    shared_data: the folder holding cifar10-resnets/ and hymenoptera/
      (default: ../shared/data beside the repository).

  Raises:
    FileNotFoundError: naming the weights or images that are missing.
  """
  root = os.path.abspath(shared_data) if shared_data else SHARED
  weights, images = os.path.join(root, WEIGHTS), os.path.join(root, IMAGES)
  missing = [path for path in (weights, images) if not os.path.exists(path)]
  if missing:
    raise FileNotFoundError(
        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: "
        "configs/cifar_to_ants.py needs the real CIFAR-10 "
        "ResNet-56 weights and the hymenoptera (ants vs bees) images of ../shared/data beside "
        "the repository; if they are elsewhere, pass their folder as "
        "--config configs/cifar_to_ants.py:/path/to/shared/data.")
  config = defaults.base_config()
  config.model.name = "cifar_resnet56"
  config.init.weights = weights
  config.init.source = "torchvision"
  config.data.source = "folder"
  config.data.path = images
  config.data.train_split = "train"
  config.data.eval_split = "val"
  config.data.image_size = 32
  config.data.resize_size = 32
  config.data.augment = "none"  # deterministic: frozen runs train from the prefix cache
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = TOTAL_STEPS
  # Evaluate and checkpoint at the end of a run only.
  config.eval_every_steps = TOTAL_STEPS
  config.checkpoint_every_steps = TOTAL_STEPS
  config.log_every_steps = 50
  config.optimizer.learning_rate = LEARNING_RATE
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_steps = 5
  config.prefix_cache.enabled = True  # directory "": the default cache directory
  return config


def sweep():
  """Each method from the pretrained weights, then from random ones, over SEEDS."""
  points = []
  for method, overrides in METHODS.items():
    points += seeded(f"{method}-pretrained", overrides, SEEDS)
    points += seeded(f"{method}-random", {**overrides, **RANDOM_INIT}, SEEDS)
  return points
