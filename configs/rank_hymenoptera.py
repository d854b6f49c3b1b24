"""Which source and how deep to freeze, for ants vs bees, before any fine-tuning.

    .venv/bin/tlflax rank --config configs/rank_hymenoptera.py --output workdirs/rank_hymenoptera

Ranks every stage of four real pretrained networks as starting points for
the 245 ants-and-bees training photos of `../shared/data/hymenoptera/`: the
ImageNet EfficientNet-Lite0, -Lite1 and -Lite2 of the `test` extra's wheels,
and the CIFAR-10 ResNet-56 of `../shared/data/cifar10-resnets/`. Each
candidate's features of the training split are scored by every score of
`tlflax.transferability`; the validation photos are never read. 64 px, as
`configs/hymenoptera.py` trains, so its sweep checks the Lite0 ranking
(`experiments/rank_validation.py`); each network's pixels are scaled as its
weights expect.
"""

import os

from tlflax import defaults

SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                       "shared", "data"))
IMAGES = "hymenoptera"
CIFAR_WEIGHTS = os.path.join("cifar10-resnets", "resnet56-4bfd9763.th")
IMAGE_SIZE = 64
RESIZE_SIZE = 73


def get_config(shared_data: str = ""):
  """The target (ants vs bees, training split) and the candidates.

  Args:
    shared_data: the folder holding hymenoptera/ and cifar10-resnets/
      (default: ../shared/data beside the repository).

  Raises:
    FileNotFoundError: naming what is missing.
  """
  root = os.path.abspath(shared_data) if shared_data else SHARED
  images, cifar = os.path.join(root, IMAGES), os.path.join(root, CIFAR_WEIGHTS)
  missing = [p for p in (images, cifar) if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"{' and '.join(missing)} missing: configs/rank_hymenoptera.py needs the hymenoptera "
        "photos and the CIFAR-10 ResNet-56 of ../shared/data beside the repository; if they "
        "are elsewhere, pass their folder as --config configs/rank_hymenoptera.py:/path/to/data.")
  config = defaults.base_config()
  config.data.source = "folder"
  config.data.path = images
  config.data.train_split = "train"
  config.data.eval_split = "val"
  config.data.image_size = IMAGE_SIZE
  config.data.resize_size = RESIZE_SIZE
  config.eval_batch_size = 64
  config.rank.sources = ",".join([
      "efficientnet_lite0.tf_in1k", "efficientnet_lite1.tf_in1k", "efficientnet_lite2.tf_in1k",
      f"cifar_resnet56={cifar}"])
  config.rank.stages = "all"
  return config
