"""Bad weight files and wrong names fail clearly, and never run code; the merge reports."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from tlflax import models, weights
from tlflax.weights import WeightsError


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
  torch.manual_seed(0)
  torch.save(torchvision.models.resnet18().state_dict(), path)
  return path


def test_truncated_file(resnet18_file, tmp_path):
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(resnet18_file.read_bytes()[:100_000])
  with pytest.raises(WeightsError, match="truncated"):
    weights.load("resnet18", truncated, source="torchvision")


def test_empty_and_missing_files(tmp_path):
  (tmp_path / "empty.pth").write_bytes(b"")
  with pytest.raises(WeightsError, match="empty"):
    weights.load("resnet18", tmp_path / "empty.pth", source="torchvision")
  with pytest.raises(WeightsError, match="does not exist"):
    weights.load("resnet18", tmp_path / "nothing.pth", source="torchvision")


def test_file_of_another_architecture(resnet18_file):
  with pytest.raises(WeightsError, match="(?s)do not fit model .resnet50.*missing from the file.*stage1/block1/bn3.*model name matches"):
    weights.load("resnet50", resnet18_file, source="torchvision")
  with pytest.raises(WeightsError, match="no place in a VGG.*layer1"):
    weights.load("vgg11", resnet18_file, source="torchvision")


class RunsCode:
  """Unpickling this would run a shell command that leaves a marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_and_never_run(layout, tmp_path):
  marker = tmp_path / "code_was_run"
  path = tmp_path / "evil.pth"
  payload = {"conv1.weight": torch.zeros(1), "trap": RunsCode(marker)}
  torch.save(payload, path, _use_new_zipfile_serialization=(layout == "zip"))
  with pytest.raises(WeightsError, match="weights_only=True"):
    weights.load("resnet18", path, source="torchvision")
  assert not marker.exists()


def test_plain_pickle_is_refused(tmp_path):
  marker = tmp_path / "code_was_run"
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps(RunsCode(marker)))
  with pytest.raises(WeightsError):
    weights.load("resnet18", path, source="torchvision")
  assert not marker.exists()


def test_unknown_model_and_source(resnet18_file):
  with pytest.raises(WeightsError, match="Unknown model 'resnet19'"):
    weights.load("resnet19", resnet18_file, source="torchvision")
  with pytest.raises(WeightsError, match="Unknown weight source 'caffe'.*torchvision"):
    weights.load("resnet18", resnet18_file, source="caffe")
  with pytest.raises(WeightsError, match="Say which framework"):
    weights.load("resnet18", resnet18_file)


def test_timm_refuses_non_resnets(resnet18_file):
  with pytest.raises(WeightsError, match="ImageNet ResNets"):
    weights.load("vgg11", resnet18_file, source="timm")


def test_merge_into_new_head_reports_exactly(resnet18_file):
  pretrained = weights.load("resnet18", resnet18_file, source="torchvision")
  model = models.get_model("resnet18", num_classes=3)
  fresh = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  merged, report = weights.merge_pretrained(fresh, pretrained)
  assert report.reinitialised == ["params/head/bias", "params/head/kernel"]
  assert report.skipped == []
  assert len(report.loaded) == len(jax.tree.leaves(fresh)) - 2
  np.testing.assert_array_equal(merged["params"]["stem"]["conv"]["kernel"],
                                pretrained["params"]["stem"]["conv"]["kernel"])
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"],
                                fresh["params"]["head"]["kernel"])
  assert "re-initialised 2" in str(report)

  # A head-less model skips the file's head.
  headless = models.get_model("resnet18", num_classes=None)
  fresh = headless.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  _, report = weights.merge_pretrained(fresh, pretrained)
  assert report.skipped == ["params/head/bias", "params/head/kernel"]
  assert report.reinitialised == []


def test_merge_refuses_backbone_mismatch(resnet18_file):
  pretrained = weights.load("resnet18", resnet18_file, source="torchvision")
  model = models.get_model("resnet34", num_classes=3)
  fresh = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(WeightsError, match="80 missing from the file: .*params/stage1/block3/conv1/kernel"):
    weights.merge_pretrained(fresh, pretrained)


def test_registry_id_of_another_model_fails_before_any_download(monkeypatch):
  from tlflax.weights import download  # pylint: disable=import-outside-toplevel

  def no_download(*args, **kwargs):
    raise AssertionError("must not download")

  monkeypatch.setattr(download, "fetch", no_download)
  with pytest.raises(WeightsError, match="holds weights for 'resnet18', not 'resnet50'"):
    weights.load("resnet50", "resnet18.tv_in1k")
