"""Fine-tune from an image folder: ants vs bees with the real CIFAR ResNet-56 weights.

    .venv/bin/python -m tlflax.main --config configs/folder.py --workdir workdirs/ants_bees

Reads `../shared/data/hymenoptera/{train,val}/{ants,bees}` (any folder with one
sub-folder per class works: `--config.data.path=...`), at 32x32 because the
weights are CIFAR-10 ones, with a new two-class head and full fine-tuning.
"""

import os

from tlflax import defaults

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data")


def get_config():
  config = defaults.base_config()
  config.model.name = "cifar_resnet56"
  config.init.weights = os.path.join(SHARED, "cifar10-resnets", "resnet56-4bfd9763.th")
  config.init.source = "torchvision"
  config.data.source = "folder"
  config.data.path = os.path.join(SHARED, "hymenoptera")
  config.data.train_split = "train"
  config.data.eval_split = "val"
  config.data.image_size = 32
  config.data.resize_size = 32
  config.data.augment = "random_resized_crop"
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 15.0
  config.freeze.rules = "none"
  config.optimizer.learning_rate = 0.01
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_steps = 10
  config.log_every_steps = 10
  return config
