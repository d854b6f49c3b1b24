"""Inception-v3 weights: torchvision `inception_v3` and keras.applications `InceptionV3`.

One name table per source:

* `TORCHVISION_NAMES`: torchvision's module names (`Mixed_5b.branch1x1.conv`)
  -> ours (`stage1/mixed_5b/branch1x1/conv`), read by the generic torchvision
  converter. The auxiliary classifier (`AuxLogits.*`, 3,326,696 parameters
  in torchvision's file) is not part of tlflax's model (see
  `tlflax.models.inception`): its tensors are left out, and the converter
  says so in a log line instead of failing.
* `KERAS_LAYERS`: Keras names InceptionV3's layers automatically (`conv2d`,
  `conv2d_1`, ..., `batch_normalization_93`; the published file starts at
  `conv2d_1`, a second model in a session at `conv2d_94`), so the table
  maps by position: the i-th convolution and BatchNorm Keras created belong
  to the i-th path of `tlflax.models.inception.conv_paths()`. Keras'
  BatchNorms have no scale (`scale=False`): beta, moving mean and variance.
"""

from __future__ import annotations

import logging

import numpy as np

from tlflax.data.images import TF, Preprocessing
from tlflax.models import get_model, inception
from tlflax.weights import keras as keras_reader
from tlflax.weights.entry import FileHash, PretrainedWeights
from tlflax.weights.merge import WeightsError
from tlflax.weights.reading import read_torch_file
from tlflax.weights.torchvision import convert_state_dict

log = logging.getLogger(__name__)

SOURCES = {"inception_v3": ("torchvision",), "keras_inception_v3": ("keras",)}

# (regex over torchvision's module name, our path template; see weights/torchvision.py)
TORCHVISION_NAMES = (
    (r"Conv2d_(\w+)\.(conv|bn)", "stem/conv2d_{0}/{1}"),
    (r"Mixed_5([bcd])\.(\w+)\.(conv|bn)", "stage1/mixed_5{0}/{1}/{2}"),
    (r"Mixed_6([a-e])\.(\w+)\.(conv|bn)", "stage2/mixed_6{0}/{1}/{2}"),
    (r"Mixed_7([abc])\.(\w+)\.(conv|bn)", "stage3/mixed_7{0}/{1}/{2}"),
    (r"fc", "head"),
)
# torchvision's auxiliary classifier, which tlflax does not build.
AUXILIARY_PREFIX = "AuxLogits."

# Keras' BatchNormalization(scale=False): no gamma.
BATCH_NORM_WITHOUT_SCALE = (("beta", "params", "bias"),
                            ("moving_mean", "batch_stats", "mean"),
                            ("moving_variance", "batch_stats", "var"))
# (Keras layer name after `number_by_creation`, our module path, kind), by position.
KERAS_LAYERS = tuple(
    row for i, path in enumerate(inception.conv_paths())
    for row in ((f"conv2d_{i}", f"{path}/conv", keras_reader.CONV),
                (f"batch_normalization_{i}", f"{path}/bn", BATCH_NORM_WITHOUT_SCALE))
) + (("predictions", "head", keras_reader.DENSE),)


def convert(model_name: str, path: str, source: str) -> dict[str, np.ndarray]:
  """Reads an Inception-v3 file of `source` for `model_name`.

  Args:
    model_name: "inception_v3" (torchvision files) or "keras_inception_v3"
      (Keras `.h5`, `.weights.h5`, `.keras`).
    path: the weight file.
    source: "torchvision" or "keras".

  Returns:
    Flat `{"params/...": array, "batch_stats/...": array}` in our names,
    without `head` when the file has no classifier.

  Raises:
    WeightsError: a source this model does not take, or tensors/layers that
      have no place in it.
  """
  if source not in SOURCES[model_name]:
    raise WeightsError(f"{model_name!r} takes {' or '.join(SOURCES[model_name])} weights, "
                       f"not {source}; " + ("keras_inception_v3 reads Keras files."
                                            if model_name == "inception_v3" else
                                            "inception_v3 reads torchvision files."))
  if source == "keras":
    layers = keras_reader.number_by_creation(keras_reader.read_keras_file(path),
                                             ("conv2d", "batch_normalization"))
    return keras_reader.convert_layers(layers, KERAS_LAYERS, f"a {model_name}")
  state_dict = read_torch_file(path)
  auxiliary = [k for k in state_dict if k.startswith(AUXILIARY_PREFIX)]
  if auxiliary:
    count = sum(int(np.size(state_dict[k])) for k in auxiliary
                if not k.endswith("num_batches_tracked"))
    log.warning("%s: left out %d AuxLogits tensors (%s values): torchvision's auxiliary "
                "classifier, which only adds a loss in training; tlflax's inception_v3 "
                "does not build it.", path, len(auxiliary), f"{count:,}")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(AUXILIARY_PREFIX)}
  return convert_state_dict(state_dict, get_model(model_name), names=TORCHVISION_NAMES)


# Options a torchvision file cannot carry, so `tlflax.weights.convert` assumes
# the model's default and logs it: option -> (why that value, what to pass instead).
ASSUMED_OPTIONS = {
    "inception_v3": {
        "transform_input": ("torchvision's pretrained setting",
                            "transform_input=False for a network trained without it"),
    },
}

# torchvision's Inception_V3_Weights.IMAGENET1K_V1: 342 -> 299, bilinear, ImageNet
# mean/std, read by inception_v3's transform_input (on by default, as torchvision
# sets it for these weights; see InceptionV3.transform_input).
_TORCHVISION_FILE = "inception_v3_google-0cc3c7bd.pth"
# Keras prescribes no resize; 342 -> 299 is the same 0.875 crop ratio as 256 -> 224.
_KERAS_PATH = "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5"

PRETRAINED = (
    PretrainedWeights(
        id="inception_v3.tv_in1k", model_name="inception_v3", source="torchvision",
        url="https://download.pytorch.org/models/" + _TORCHVISION_FILE,
        file_name=_TORCHVISION_FILE,
        hash=FileHash("sha256", "0cc3c7bd", "the sha256 prefix in torchvision's file name "
                      "(what torch.hub checks)"),
        preprocessing=Preprocessing(crop_size=299, resize_size=342), reported_top1=77.294),
    PretrainedWeights(
        id="keras_inception_v3.in1k", model_name="keras_inception_v3", source="keras",
        url="https://storage.googleapis.com/tensorflow/keras-applications/" + _KERAS_PATH,
        file_name=_KERAS_PATH.rsplit("/", 1)[1],
        hash=FileHash("md5", "9a0d58056eeedaa3f26cb7ebd46da564",
                      "the md5 keras.applications passes to keras.utils.get_file"),
        preprocessing=Preprocessing(crop_size=299, resize_size=342, mean=TF.mean, std=TF.std)),
)
