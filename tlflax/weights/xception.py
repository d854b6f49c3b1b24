"""Xception weights: keras.applications `Xception` and timm's `legacy_xception`.

One name table per source, both built by a loop over the blocks (as VGG's
torchvision table is), from the block correspondence in
`tlflax.models.xception` (Keras block2..14, timm block1..12 + conv3/conv4):

* `KERAS_LAYERS`: Keras' named layers (`block5_sepconv2`, `block5_sepconv2_bn`,
  ...) by name; the four shortcut convolutions and their BatchNorms are
  unnamed in keras.applications (`conv2d`, `batch_normalization`, numbered
  across the session), so they are mapped by creation order
  (`tlflax.weights.keras.number_by_creation`). A separable convolution has a
  `depthwise_kernel` (3, 3, C, 1), stored here as a grouped convolution's
  (3, 3, 1, C), and a `pointwise_kernel`.
* `TIMM_NAMES`: timm's module names (`block4.rep.4.pointwise`) -> ours, read
  by the generic torchvision converter (a depthwise weight (C, 1, 3, 3) is a
  4-D convolution weight like any other).
"""

from __future__ import annotations

import numpy as np

from tlflax.data.images import TF, Preprocessing
from tlflax.models import get_model
from tlflax.weights import keras as keras_reader
from tlflax.weights.entry import FileHash, PretrainedWeights
from tlflax.weights.merge import WeightsError
from tlflax.weights.reading import read_torch_file
from tlflax.weights.torchvision import convert_state_dict

SOURCES = {"keras_xception": ("keras",), "legacy_xception": ("timm",)}

# Our block paths in network order with their separable convolution count,
# the shortcut they have, and the first-convolution ReLU (timm's rep indices).
_BLOCKS = (("stage1/block1", 2, True, False), ("stage2/block1", 2, True, True),
           ("stage3/block1", 2, True, True),
           *((f"stage4/block{j}", 3, False, True) for j in range(1, 9)),
           ("stage5/block1", 2, True, True))
_EXIT_CONVS = "stage5/block2"  # Keras block14, timm conv3/bn3 and conv4/bn4

SEPARABLE = (("depthwise_kernel", "params", "depthwise/kernel"),
             ("pointwise_kernel", "params", "pointwise/kernel"))


def _keras_layers():
  table = [("block1_conv1", "stem/conv1", keras_reader.CONV),
           ("block1_conv1_bn", "stem/bn1", keras_reader.BATCH_NORM),
           ("block1_conv2", "stem/conv2", keras_reader.CONV),
           ("block1_conv2_bn", "stem/bn2", keras_reader.BATCH_NORM)]
  blocks = [(path, convs) for path, convs, _, _ in _BLOCKS] + [(_EXIT_CONVS, 2)]
  for keras_block, (path, convs) in enumerate(blocks, start=2):
    for k in range(1, convs + 1):
      table += [(f"block{keras_block}_sepconv{k}", f"{path}/sepconv{k}", SEPARABLE),
                (f"block{keras_block}_sepconv{k}_bn", f"{path}/bn{k}", keras_reader.BATCH_NORM)]
  shortcuts = [path for path, _, shortcut, _ in _BLOCKS if shortcut]
  for i, path in enumerate(shortcuts):
    table += [(f"conv2d_{i}", f"{path}/shortcut_conv", keras_reader.CONV),
              (f"batch_normalization_{i}", f"{path}/shortcut_bn", keras_reader.BATCH_NORM)]
  table.append(("predictions", "head", keras_reader.DENSE))
  return tuple(table)


def _timm_names():
  table = [("conv1", "stem/conv1"), ("bn1", "stem/bn1"), ("conv2", "stem/conv2"),
           ("bn2", "stem/bn2")]
  for timm_block, (path, convs, shortcut, relu_first) in enumerate(_BLOCKS, start=1):
    if shortcut:
      table += [(rf"block{timm_block}\.skip", f"{path}/shortcut_conv"),
                (rf"block{timm_block}\.skipbn", f"{path}/shortcut_bn")]
    # timm's `rep` runs [ReLU], SeparableConv2d, BatchNorm2d, ReLU, ...
    for k in range(1, convs + 1):
      index = 3 * (k - 1) + (1 if relu_first else 0)
      table += [(rf"block{timm_block}\.rep\.{index}\.conv1", f"{path}/sepconv{k}/depthwise"),
                (rf"block{timm_block}\.rep\.{index}\.pointwise", f"{path}/sepconv{k}/pointwise"),
                (rf"block{timm_block}\.rep\.{index + 1}", f"{path}/bn{k}")]
  for k, timm_index in ((1, 3), (2, 4)):
    table += [(rf"conv{timm_index}\.conv1", f"{_EXIT_CONVS}/sepconv{k}/depthwise"),
              (rf"conv{timm_index}\.pointwise", f"{_EXIT_CONVS}/sepconv{k}/pointwise"),
              (rf"bn{timm_index}", f"{_EXIT_CONVS}/bn{k}")]
  table.append(("fc", "head"))
  return tuple(table)


KERAS_LAYERS = _keras_layers()
TIMM_NAMES = _timm_names()


def convert(model_name: str, path: str, source: str) -> dict[str, np.ndarray]:
  """Reads an Xception file of `source` for `model_name`.

  Args:
    model_name: "keras_xception" (Keras `.h5`, `.weights.h5`, `.keras`) or
      "legacy_xception" (timm `.pth` / `.safetensors`).
    path: the weight file.
    source: "keras" or "timm".

  Returns:
    Flat `{"params/...": array, "batch_stats/...": array}` in our names,
    without `head` when the file has no classifier.

  Raises:
    WeightsError: a source this model does not take, or tensors/layers that
      have no place in it.
  """
  if source not in SOURCES[model_name]:
    other = "legacy_xception reads timm files" if source == "timm" else (
        "keras_xception reads Keras files")
    raise WeightsError(f"{model_name!r} takes {' or '.join(SOURCES[model_name])} weights, "
                       f"not {source}; {other}.")
  if source == "timm":
    return convert_state_dict(read_torch_file(path), get_model(model_name), names=TIMM_NAMES)
  layers = keras_reader.number_by_creation(keras_reader.read_keras_file(path),
                                           ("conv2d", "batch_normalization"))
  flat = keras_reader.convert_layers(layers, KERAS_LAYERS, f"a {model_name}")
  # Keras' depthwise kernel (3, 3, C, 1) -> a grouped convolution's (3, 3, 1, C).
  return {key: value.transpose(0, 1, 3, 2) if key.endswith("depthwise/kernel") else value
          for key, value in flat.items()}


_KERAS_PATH = "xception/xception_weights_tf_dim_ordering_tf_kernels.h5"
_TIMM_NO_HASH = ("timm downloads this file without checking a hash (torch.hub with "
                 "check_hash off); the '43020ad28' in its name follows torch.hub's sha256-prefix "
                 "convention but could not be verified offline, so it is not enforced")

PRETRAINED = (
    PretrainedWeights(
        id="keras_xception.in1k", model_name="keras_xception", source="keras",
        url="https://storage.googleapis.com/tensorflow/keras-applications/" + _KERAS_PATH,
        file_name=_KERAS_PATH.rsplit("/", 1)[1],
        hash=FileHash("md5", "0a58e3b7378bc2990ea3b43d5981f1f6",
                      "the md5 keras.applications passes to keras.utils.get_file"),
        # Keras' "tf" scaling; Keras prescribes no resize: 342 -> 299 (ratio 0.875).
        preprocessing=Preprocessing(crop_size=299, resize_size=342, mean=TF.mean, std=TF.std)),
    PretrainedWeights(
        # timm's pretrained_cfg: crop_pct 0.8975 (resize floor(299 / 0.8975) = 333),
        # bicubic, mean = std = 0.5.
        id="legacy_xception.tf_in1k", model_name="legacy_xception", source="timm",
        url=("https://github.com/rwightman/pytorch-image-models/releases/download/"
             "v0.1-cadene/xception-43020ad28.pth"),
        file_name="xception-43020ad28.pth", hash=None, hash_note=_TIMM_NO_HASH,
        preprocessing=Preprocessing(crop_size=299, resize_size=333, interpolation="bicubic",
                                    mean=TF.mean, std=TF.std),
        # The accuracy timm's xception.py docstring gives for this port.
        reported_top1=78.892),
)
