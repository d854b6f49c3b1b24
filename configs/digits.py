"""Train a CIFAR ResNet-20 on the offline digits 0-4 (the demo's source task).

    .venv/bin/python -m tlflax.main --config configs/digits.py --workdir workdirs/digits

Expected: about 99% test accuracy on digits 0-4 after 10 epochs (a minute on 2 CPU cores).
"""

from tlflax import defaults


def get_config():
  config = defaults.base_config()
  config.model.name = "cifar_resnet20"
  config.data.source = "digits"
  config.data.name = "source"
  config.data.image_size = 32
  config.data.mean = (0.5, 0.5, 0.5)
  config.data.std = (0.5, 0.5, 0.5)
  config.data.augment = "crop_flip"
  config.batch_size = 64
  config.eval_batch_size = 200
  config.num_epochs = 10.0
  config.log_every_steps = 10
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.05
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_steps = 20
  return config
