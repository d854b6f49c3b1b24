"""Xception (models/xception.py, weights/xception.py) against Keras and timm.

References are the real libraries with random weights and BatchNorm
statistics. 91 px (Keras' minimum is 71) gives the stage2 pool a 22x22 and the exit-flow
pool a 6x6 input: even sizes, where Keras' TF "same" pool and timm's
symmetric one differ, so each model's padding is tested, not only its weights.
"""

import json
import os

import h5py
import jax
import keras
import numpy as np
import pytest
import torch

from conftest import (FLOAT64_TOLERANCE, INFERENCE_TOLERANCE, float32_conditioning,
                      float32_train_bound, relative_error, report_parity)
from test_inception import (apply_in_float64, apply_jit, count_parameters, random_variables)
from test_keras_parity import (build_keras, keras_train_mode, load_all_layouts,
                               save_all_layouts, save_applications_layout)
from test_torchvision_parity import randomize_batchnorm, to_nhwc
from tlflax import freeze, models, weights
from tlflax.cli import classify as classify_cli
from tlflax.cli import convert as convert_cli
from tlflax.cli import features as features_cli
from tlflax.weights import WeightsError

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

SIZE = 91
CLASSES = 10


def calibrate_running_statistics(reference):
  """Running statistics from one batch of images, then scattered.

  timm's initialisation leaves this network's activations far from the
  random statistics `randomize_batchnorm` sets, so every BatchNorm output
  would be nearly its constant shift and the logits would hardly depend on the
  image (or on a pool's padding). Statistics measured on a batch (PyTorch
  momentum 1), each scaled by a random factor, keep every layer's output
  image-dependent and still unlike a fresh initialisation.
  """
  generator = torch.Generator().manual_seed(1)
  norms = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for norm in norms:
    norm.momentum = 1.0
  reference.train()
  with torch.no_grad():
    reference(torch.randn(8, 3, SIZE, SIZE, generator=generator))
  for norm in norms:
    norm.momentum = 0.1
    n = norm.num_features
    norm.running_mean.add_(torch.randn(n, generator=generator) * 0.1 *
                           norm.running_var.sqrt())
    norm.running_var.mul_(torch.rand(n, generator=generator) + 0.5)
  reference.eval()


@pytest.fixture(name="timm_file", scope="module")
def fixture_timm_file(tmp_path_factory):
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  reference = timm.create_model("legacy_xception", pretrained=False, num_classes=CLASSES)
  randomize_batchnorm(reference)
  calibrate_running_statistics(reference)
  reference.eval()
  path = tmp_path_factory.mktemp("xception") / "model.safetensors"
  save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
  return reference, str(path)


def test_timm_inference_parity(timm_file):
  reference, path = timm_file
  variables = weights.load("legacy_xception", path, source="timm")
  model = models.get_model("legacy_xception", num_classes=CLASSES)
  images = np.random.RandomState(1).randn(2, 3, SIZE, SIZE).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
    exact = reference.double()(torch.from_numpy(images).double()).numpy()
  reference.float()
  error = relative_error(apply_jit(model, variables, to_nhwc(images)), expected)
  error64 = relative_error(apply_in_float64(model, variables, images), exact)
  report_parity("legacy_xception", "timm", inference32=error, inference64=error64)
  assert error < INFERENCE_TOLERANCE and error64 < FLOAT64_TOLERANCE
  # Keras' padding on timm's weights misses by more than the tolerance: the
  # parity check sees the padding, not only the weights.
  keras_padding = model.clone(pool_padding="tf_same")
  other = relative_error(apply_jit(keras_padding, variables, to_nhwc(images)), expected)
  print(f"legacy_xception with Keras' pool padding: {other:.2e}")
  assert other > INFERENCE_TOLERANCE


@pytest.mark.slow
def test_timm_train_mode_parity(timm_file):
  reference, path = timm_file
  variables = weights.load("legacy_xception", path, source="timm")
  model = models.get_model("legacy_xception", num_classes=CLASSES)
  images = np.random.RandomState(2).randn(4, 3, SIZE, SIZE).astype(np.float32)
  reference.train()
  with torch.no_grad():
    expected32 = reference(torch.from_numpy(images)).numpy()
    exact = reference.double()(torch.from_numpy(images).double()).numpy()
  reference.float().eval()
  bound = float32_train_bound(relative_error(expected32, exact))
  error = relative_error(apply_jit(model, variables, to_nhwc(images), train=True), exact)
  error64 = relative_error(apply_in_float64(model, variables, images, train=True), exact)
  report_parity("legacy_xception", "timm", train32=error, train32_bound=bound, train64=error64)
  assert error < bound and error64 < FLOAT64_TOLERANCE


def test_parameter_count_equals_timms(timm_file):
  reference, _ = timm_file
  head = 2048 * CLASSES + CLASSES
  expected = sum(p.numel() for p in reference.parameters()) - head + 2048 * 1000 + 1000
  assert count_parameters("legacy_xception") == expected == 22_855_952


def test_a_timm_file_for_keras_and_back(timm_file):
  _, path = timm_file
  with pytest.raises(WeightsError, match="takes keras weights, not timm; legacy_xception"):
    weights.load("keras_xception", path, source="timm")
  with pytest.raises(WeightsError, match="takes timm weights, not torchvision"):
    weights.load("legacy_xception", path, source="torchvision")


# ----------------------------------------------------------------------------
# Keras
# ----------------------------------------------------------------------------

@pytest.fixture(name="keras_files", scope="module")
def fixture_keras_files(tmp_path_factory):
  """Keras Xception saved in every layout, and a second one of the session (conv2d_4...)."""
  directory = tmp_path_factory.mktemp("keras_xception")
  first = build_keras(keras.applications.Xception, classes=CLASSES, input_shape=(SIZE, SIZE, 3))
  paths = save_all_layouts(first, directory)
  second = build_keras(keras.applications.Xception, seed=1, classes=CLASSES,
                       input_shape=(SIZE, SIZE, 3))
  save_applications_layout(second, directory / "second.h5")
  return first, paths, second, directory / "second.h5"


@pytest.mark.slow  # building Keras Xceptions takes most of a minute
def test_keras_inference_parity_in_every_layout(keras_files):
  first, paths, second, second_path = keras_files
  model = models.get_model("keras_xception", num_classes=CLASSES)
  images = np.random.RandomState(1).randn(2, SIZE, SIZE, 3).astype(np.float32)
  variables = load_all_layouts("keras_xception", paths)
  error = relative_error(apply_jit(model, variables, images),
                         np.asarray(first(images, training=False)))
  report_parity("keras_xception", "keras", inference32=error)
  assert error < INFERENCE_TOLERANCE
  # The shortcuts are unnamed: the second model's carry later numbers.
  with h5py.File(second_path, "r") as f:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
  numbers = [int(n.rsplit("_", 1)[1]) for n in names if n.startswith("conv2d_")]
  assert len(numbers) == 4 and min(numbers) >= 4, numbers
  variables = weights.load("keras_xception", second_path, source="keras")
  assert relative_error(apply_jit(model, variables, images),
                        np.asarray(second(images, training=False))) < INFERENCE_TOLERANCE


@pytest.mark.slow
def test_keras_train_mode_parity(keras_files, monkeypatch):
  first, paths, _, _ = keras_files
  variables = weights.load("keras_xception", paths["keras3"], source="keras")
  model = models.get_model("keras_xception", num_classes=CLASSES)
  images = np.random.RandomState(2).randn(4, SIZE, SIZE, 3).astype(np.float32)
  expected = keras_train_mode(first, images, monkeypatch)
  # Keras cannot run in float64; our own float32 error stands in for its own.
  bound = float32_train_bound(float32_conditioning(model, variables, images))
  error = relative_error(apply_jit(model, variables, images, train=True), expected)
  report_parity("keras_xception", "keras", train32=error, train32_bound=bound)
  assert error < bound


@pytest.mark.slow  # building Keras Xceptions takes most of a minute
def test_parameter_count_equals_keras(keras_files):
  first, _, _, _ = keras_files
  head = 2048 * CLASSES + CLASSES
  expected = sum(int(np.prod(w.shape)) for w in first.trainable_weights) - head + 2048 * 1000 + 1000
  assert count_parameters("keras_xception") == expected == 22_855_952


# ----------------------------------------------------------------------------
# Every workflow: stages, freezing, truncation, dtypes
# ----------------------------------------------------------------------------

def test_stages_freezing_truncation_and_dtypes():
  name = "keras_xception"
  model = models.get_model(name)
  variables = random_variables(name)
  images = np.random.RandomState(4).randn(2, SIZE, SIZE, 3).astype(np.float32)
  features = jax.jit(lambda v, x: models.extract_features(model, v, x))(variables, images)
  assert {k: v.shape[1:] for k, v in features.items()} == {
      "stem": (43, 43, 64), "stage1": (22, 22, 128), "stage2": (11, 11, 256),
      "stage3": (6, 6, 728), "stage4": (6, 6, 728), "stage5": (3, 3, 2048),
      "pre_logits": (2048,), "logits": (1000,)}
  resumed = apply_jit(model.clone(input_stage="stage3"), variables, features["stage3"])
  np.testing.assert_allclose(resumed, features["logits"], rtol=1e-5, atol=1e-5)
  low = apply_jit(models.get_model(name, num_classes=None, dtype="bfloat16"), variables, images)
  # bfloat16's 8-bit mantissa over ~40 layers: a few percent.
  assert low.dtype == np.float32 and relative_error(low, features["pre_logits"]) < 0.1

  params, names = variables["params"], model.stage_names
  # depth:K freezes the stem and the first K stages.
  depth = freeze.compile_rules(freeze.rules_from_spec("depth:3", names), params)
  frozen = sorted({p.split("/")[0] for p, m in depth.path_multiplier.items() if m == 0})
  assert frozen == ["stage1", "stage2", "stage3", "stem"]
  surgical = freeze.compile_rules(freeze.rules_from_spec("surgical:stage4", names), params)
  assert sorted({p.split("/")[0] for p in surgical.trainable_paths}) == ["head", "stage4"]
  decay = freeze.compile_rules(freeze.rules_from_spec("lld:0.5", names), params)
  assert decay.path_multiplier["stage5/block2/sepconv2/pointwise/kernel"] == 0.5
  assert decay.path_multiplier["stem/conv1/kernel"] == 0.5 ** 6
  patterns = depth.frozen_batchnorm(variables["batch_stats"])
  assert "stage3/block1/shortcut_bn" in patterns
  assert not any(p.startswith("stage4") for p in patterns)


# ----------------------------------------------------------------------------
# Command lines: convert, classify, features (keras_xception and inception_v3)
# ----------------------------------------------------------------------------

@pytest.fixture(name="digits_dir", scope="module")
def fixture_digits_dir(tmp_path_factory):
  from tlflax.data import digits  # pylint: disable=import-outside-toplevel
  path = str(tmp_path_factory.mktemp("tfds"))
  digits.prepare("source", path)
  return path


def run_features(name, checkpoint, stage, digits_dir, output):
  return features_cli.main([
      "--config", "configs/digits.py", "--output", output, "--stage", stage,
      "--splits", "eval", f"--config.model.name={name}", f"--config.data.image_size={SIZE}",
      f"--config.data.data_dir={digits_dir}", f"--config.init.weights={checkpoint}",
      "--config.init.source=tlflax", "--config.eval_batch_size=90"])


@pytest.mark.slow  # building Keras Xceptions takes most of a minute
def test_convert_classify_and_features_command_lines(keras_files, digits_dir, tmp_path,
                                                     capsys, monkeypatch):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  _, paths, _, _ = keras_files
  checkpoint = str(tmp_path / "ckpt")
  assert convert_cli.main(["--source", "keras", "--model", "keras_xception", "--input",
                           str(paths["legacy"]), "--output", checkpoint]) == 0
  # 22,855,952 with Keras' 1000 classes; here the head is 2048 x 10 + 10.
  assert "20,827,442 parameters, 10 classes" in capsys.readouterr().out

  image = tmp_path / "image.png"
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (90, 100, 3), np.uint8)).save(image)
  names = tmp_path / "names.txt"
  names.write_text("\n".join(f"class{i}" for i in range(CLASSES)) + "\n")
  assert classify_cli.main(["--weights", checkpoint, "--image_size", str(SIZE), "--top_k", "1",
                            "--class_names", str(names), str(image)]) == 0
  assert capsys.readouterr().out.splitlines()[-1].split()[-1].startswith("class")

  output = str(tmp_path / "features")
  assert run_features("keras_xception", checkpoint, "stage4", digits_dir, output) == 0
  with open(os.path.join(output, "info.json"), encoding="utf-8") as f:
    info = json.load(f)
  assert info["splits"]["eval"]["features_shape"] == [180, 728]
  assert info["extraction"]["model"] == "keras_xception"


def test_inception_features_command_line(digits_dir, tmp_path, capsys, monkeypatch):
  """inception_v3 from a torchvision file through convert and features."""
  import torchvision  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  torch.manual_seed(0)
  reference = torchvision.models.inception_v3(weights=None, aux_logits=True,
                                              init_weights=False, num_classes=3)
  torch.save(reference.state_dict(), tmp_path / "inception.pth")
  checkpoint = str(tmp_path / "ckpt")
  assert convert_cli.main(["--source", "torchvision", "--model", "inception_v3", "--input",
                           str(tmp_path / "inception.pth"), "--output", checkpoint]) == 0
  capsys.readouterr()
  output = str(tmp_path / "features")
  assert run_features("inception_v3", checkpoint, "stage2", digits_dir, output) == 0
  assert "Wrote stage2 features of inception_v3" in capsys.readouterr().out
  train = np.load(os.path.join(output, "eval_features.npy"))
  assert train.shape == (180, 768) and np.isfinite(train).all()


def test_registry_entries_are_the_publishers():
  import inspect  # pylint: disable=import-outside-toplevel
  from keras.src.applications import xception as keras_source  # pylint: disable=import-outside-toplevel
  from tlflax.data import images  # pylint: disable=import-outside-toplevel
  from tlflax.weights import registry  # pylint: disable=import-outside-toplevel
  entry = registry.get("keras_xception.in1k")
  assert entry.url == keras_source.WEIGHTS_PATH
  assert f'file_hash="{entry.hash.hex_digest}"' in inspect.getsource(keras_source)
  assert entry.preprocessing == images.Preprocessing(
      crop_size=299, resize_size=342, mean=images.TF.mean, std=images.TF.std)
  config = timm.models.get_pretrained_cfg("legacy_xception.tf_in1k").to_dict()
  entry = registry.get("legacy_xception.tf_in1k")
  assert entry.url == config["url"] and entry.hash is None and entry.hash_note
  crop = config["input_size"][-1]
  assert entry.preprocessing == images.Preprocessing(
      crop_size=crop, resize_size=int(crop / config["crop_pct"]),
      interpolation=config["interpolation"], mean=config["mean"], std=config["std"])
