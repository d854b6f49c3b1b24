"""tlflax checkpoints (weights/native.py) and the conversion command line (convert.py)."""

import dataclasses
import datetime
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from tlflax import tree, weights
from tlflax import files
from tlflax.weights import convert
from tlflax.data import images
from tlflax.weights import native, registry
from tlflax.tree import flatten
from tlflax.weights.merge import WeightsError
from tlflax.cli import convert as convert_cli

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(name="resnet18_file", scope="module")
def fixture_resnet18_file(tmp_path_factory):
  """A torchvision resnet18 .pth with random weights and BatchNorm statistics."""
  torch.manual_seed(0)
  model = torchvision.models.resnet18()
  for layer in model.modules():
    if isinstance(layer, torch.nn.BatchNorm2d):
      layer.running_mean.normal_(0, 0.5)
      layer.running_var.uniform_(0.5, 2.0)
  path = tmp_path_factory.mktemp("torchvision") / "resnet18_random.pth"
  torch.save(model.state_dict(), path)
  return str(path)


@pytest.fixture(name="checkpoint", scope="module")
def fixture_checkpoint(resnet18_file, tmp_path_factory):
  """The CLI's conversion of `resnet18_file` (run once: start-up is slow)."""
  output = str(tmp_path_factory.mktemp("converted") / "resnet18")
  result = subprocess.run(
      [sys.executable, "-m", "tlflax.cli.convert", "--source", "torchvision", "--model",
       "resnet18", "--input", resnet18_file, "--output", output],
      capture_output=True, text=True, cwd=REPO_ROOT, check=False)
  assert result.returncode == 0, result.stderr
  assert "11,689,512 parameters" in result.stdout and output in result.stdout
  return output


def assert_same_variables(actual, expected):
  actual, expected = flatten(actual), flatten(expected)
  assert actual.keys() == expected.keys()
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype, key
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


def test_checkpoint_loads_exactly_as_the_source_file(checkpoint, resnet18_file):
  assert_same_variables(weights.load("resnet18", checkpoint, source="tlflax"),
                        weights.load("resnet18", resnet18_file, source="torchvision"))


def test_provenance_records_origin_and_preprocessing(checkpoint, resnet18_file):
  provenance = native.read_provenance(checkpoint)
  with open(resnet18_file, "rb") as f:
    sha256 = hashlib.sha256(f.read()).hexdigest()
  assert provenance["model_name"] == "resnet18"
  assert provenance["source"] == "torchvision"
  assert provenance["input_file"] == "resnet18_random.pth"
  assert provenance["input_sha256"] == sha256
  assert provenance["weight_id"] is None
  assert provenance["num_classes"] == 1000
  assert provenance["class_names"] == "imagenet1k"
  assert images.Preprocessing(**provenance["preprocessing"]) == images.TORCH
  assert provenance["format"] == native.FORMAT
  assert provenance["tlflax_version"]
  assert datetime.datetime.fromisoformat(provenance["created"]).tzinfo is not None


def test_a_published_file_name_finds_its_registry_entry(resnet18_file, tmp_path):
  published = tmp_path / "resnet18-f37072fd.pth"  # torchvision's name for its resnet18
  os.symlink(resnet18_file, published)
  variables = weights.load("resnet18", resnet18_file, source="torchvision")
  assert convert.make_provenance("resnet18", "torchvision", str(published), variables,
                                 None)["weight_id"] == "resnet18.tv_in1k"
  provenance = convert.make_provenance("keras_vgg16", "keras", "mine.h5", {}, None)
  assert images.Preprocessing(**provenance["preprocessing"]) == images.CAFFE
  assert provenance["num_classes"] is None and provenance["class_names"] is None


def test_convert_by_pretrained_id(resnet18_file, tmp_path, monkeypatch):
  monkeypatch.setenv(files.CACHE_ENV_VAR, str(tmp_path / "cache"))
  entry = registry.get("resnet18.tv_in1k")
  with open(resnet18_file, "rb") as f:
    sha256 = hashlib.sha256(f.read()).hexdigest()
  monkeypatch.setitem(registry._ENTRIES, entry.id, dataclasses.replace(  # pylint: disable=protected-access
      entry, url=f"file://{resnet18_file}",
      hash=registry.FileHash("sha256", sha256[:8], "test")))
  result = convert.convert("resnet18", "resnet18.tv_in1k", str(tmp_path / "out"))
  assert result.provenance["weight_id"] == "resnet18.tv_in1k"
  assert result.provenance["input_file"] == "resnet18-f37072fd.pth"
  assert result.provenance["source"] == "torchvision"
  with pytest.raises(WeightsError, match="weights for 'resnet18', not 'resnet34'"):
    convert.convert("resnet34", "resnet18.tv_in1k", str(tmp_path / "other"))


def test_existing_checkpoint_needs_overwrite(checkpoint, tmp_path):
  variables = weights.load("resnet18", checkpoint, source="tlflax")
  provenance = {"model_name": "resnet18", "source": "test"}
  target = str(tmp_path / "copy")
  native.save(target, variables, provenance)
  with pytest.raises(WeightsError, match="not empty.*--overwrite"):
    native.save(target, variables, provenance)
  flat = flatten(variables)
  flat["params/head/bias"] = flat["params/head/bias"] + 1.0
  native.save(target, tree.unflatten(flat), provenance, overwrite=True)
  reloaded = native.convert("resnet18", target)
  np.testing.assert_array_equal(reloaded["params/head/bias"], flat["params/head/bias"])
  assert sorted(os.listdir(tmp_path)) == ["copy"]  # no staging directories left


def test_a_directory_of_other_files_is_never_overwritten(checkpoint, tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  variables = weights.load("resnet18", checkpoint, source="tlflax")
  with pytest.raises(WeightsError, match="not a tlflax checkpoint"):
    native.save(tmp_path, variables, {"model_name": "resnet18"}, overwrite=True)
  assert (tmp_path / "notes.txt").read_text() == "mine"


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
  def broken_write(path, arrays):
    raise OSError("disk full")
  monkeypatch.setattr(native, "_write_variables", broken_write)
  with pytest.raises(OSError, match="disk full"):
    native.save(tmp_path / "ckpt", {"params": {"w": np.ones(2)}}, {"model_name": "resnet18"})
  assert os.listdir(tmp_path) == []


def test_wrong_model_name_says_what_the_checkpoint_holds(checkpoint):
  with pytest.raises(WeightsError, match="holds 'resnet18' weights.*not 'resnet34'"):
    weights.load("resnet34", checkpoint, source="tlflax")


def test_a_directory_that_is_no_checkpoint(tmp_path):
  (tmp_path / "model.pth").write_bytes(b"x")
  with pytest.raises(WeightsError, match="not a tlflax checkpoint.*model.pth"):
    native.convert("resnet18", tmp_path)
  with pytest.raises(WeightsError, match="does not exist"):
    native.read_provenance(tmp_path / "missing")


def test_cli_errors_are_one_clear_line(resnet18_file, tmp_path, capsys):
  result = subprocess.run(
      [sys.executable, "-m", "tlflax.cli.convert", "--source", "torchvision", "--model",
       "resnet19", "--input", resnet18_file, "--output", str(tmp_path / "out")],
      capture_output=True, text=True, cwd=REPO_ROOT, check=False)
  assert result.returncode != 0
  assert result.stderr.startswith("tlflax.cli.convert: error: Unknown model 'resnet19'")
  assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1

  def fails(*argv):
    assert convert_cli.main(list(argv)) != 0
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return error

  assert "neither an existing file nor a known pretrained id" in fails(
      "--source", "torchvision", "--model", "resnet18", "--input", str(tmp_path / "nope.pth"),
      "--output", str(tmp_path / "out"))
  assert "--source" in fails("--model", "resnet18", "--input", resnet18_file,
                             "--output", str(tmp_path / "out"))
  assert "do not fit model 'resnet34'" in fails(
      "--source", "torchvision", "--model", "resnet34", "--input", resnet18_file,
      "--output", str(tmp_path / "out"))
  # A misused flag is a usage error (status 2), named with its allowed values.
  assert convert_cli.main(["--source", "caffe", "--model", "resnet18", "--input", resnet18_file,
                           "--output", str(tmp_path / "out")]) == 2
  error = capsys.readouterr().err
  assert error.startswith("tlflax.cli.convert: error: flag --source=caffe") and "torchvision" in error
