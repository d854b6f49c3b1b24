"""Fine-tune torchvision's ResNet-50 (IMAGENET1K_V2) on a tensorflow-datasets task.

Needs the network once: the weights download into $TLFLAX_CACHE_DIR and the
dataset must be prepared first (`tfds build oxford_flowers102`). Then:

    .venv/bin/python -m tlflax.main --config configs/resnet50_tfds.py --workdir workdirs/flowers
    .venv/bin/python -m tlflax.main --config configs/resnet50_tfds.py:cifar10 --workdir workdirs/c10

Expected: oxford_flowers102 test accuracy in the high 90s after 30 epochs at
224 px (the usual result for an ImageNet ResNet-50 fine-tuned on Flowers-102);
not run on the development machine, which has no network.
"""

from tlflax import defaults

DATASETS = {
    # name: (train split, eval split, classes' image size, epochs)
    "oxford_flowers102": ("train+validation", "test", 224, 30.0),
    "cifar10": ("train", "test", 224, 5.0),
}


def get_config(dataset="oxford_flowers102"):
  train_split, eval_split, size, epochs = DATASETS[dataset]
  config = defaults.base_config()
  config.model.name = "resnet50"
  config.model.dtype = "bfloat16"  # float32 parameters, bfloat16 compute on accelerators
  config.init.weights = "resnet50.tv2_in1k"
  config.data.source = "tfds"
  config.data.name = dataset
  config.data.train_split = train_split
  config.data.eval_split = eval_split
  config.data.image_size = size
  config.data.resize_size = 232  # torchvision's IMAGENET1K_V2 evaluation transform
  config.data.augment = "random_resized_crop"
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = epochs
  config.freeze.rules = "none"
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.01
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 200
  config.log_every_steps = 50
  return config
