"""EfficientNet (models/efficientnet.py, weights/efficientnet.py) against torchvision and Keras.

Every model name is compared with its reference library on random weights
with random BatchNorm statistics: inference in float32 (INFERENCE_TOLERANCE)
and, for torchvision, in float64 (FLOAT64_TOLERANCE); training mode (batch
statistics, dropout and stochastic depth off on both sides) within
`float32_train_bound`. torchvision's b0 runs by default, v2-S and Keras' b0
in the slow set (CI runs both), the other sizes with `-m every_size`. Inputs are
32 px (torchvision: every stage still sees at least a 1x1 map) and 40 px for
Keras, whose stride-2 paddings then meet even (40, 20, 10) and odd (5, 3)
maps, the two cases of `correct_pad`.
"""

import os

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import torch
import torchvision

from conftest import (INFERENCE_TOLERANCE, by_run_set, float32_conditioning,
                      float32_train_bound, relative_error, report_parity)
from test_keras_parity import (build_keras, keras_train_mode, load_each_layout_in_turn,
                               max_leaf_error)
from test_torchvision_parity import (assert_inference_parity_in_float64,
                                     assert_train_mode_parity, randomize_batchnorm, to_nhwc)
from tlflax import freeze, models, tree, weights
from tlflax.data import images as images_lib
from tlflax.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from tlflax.weights import WeightsError, registry
from tlflax.weights import efficientnet as efficientnet_weights

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_SIZE = 32
KERAS_SIZE = 40
# The README test command runs torchvision's b0; the slow set v2-S (fused
# blocks) and Keras' b0 (two minutes each on 2 cores); b1-b7, v2-M and v2-L
# scale the same blocks (`pytest -m every_size`).
DEFAULT_RUN = ("efficientnet_b0",)
SLOW_RUN = ("efficientnet_v2_s", "keras_efficientnet_b0")
TORCHVISION_NAMES = [f"efficientnet_b{i}" for i in range(8)] + [
    "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"]
KERAS_NAMES = [f"keras_efficientnet_b{i}" for i in range(8)]
# What a Keras model built with weights=None holds in its Normalization layer
# once set as the published files have it (see weights/efficientnet.py).
IMAGENET_NORMALIZATION = [np.asarray(IMAGENET_MEAN, np.float32),
                          np.asarray(IMAGENET_STD, np.float32) ** 2, np.asarray(1, np.int32)]


def parameter_count(model, collection="params"):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  return sum(int(np.prod(s)) for k, s in tree.shapes(shapes).items()
             if k.startswith(collection + "/"))


def torchvision_reference(name, seed=0):
  """A torchvision EfficientNet with random weights and statistics, dropout and SD off."""
  torch.manual_seed(seed)
  reference = getattr(torchvision.models, name)(dropout=0.0, stochastic_depth_prob=0.0)
  randomize_batchnorm(reference, seed)
  return reference


def keras_reference(name, seed=0, **options):
  """keras.applications' model with random weights, ImageNet Normalization, no dropout."""
  variant = name.rsplit("_", 1)[1].upper()
  options.setdefault("input_shape", (KERAS_SIZE, KERAS_SIZE, 3))
  reference = build_keras(getattr(keras.applications, f"EfficientNet{variant}"), seed, **options)
  for layer in reference.layers:
    if isinstance(layer, keras.layers.Normalization):
      layer.set_weights(IMAGENET_NORMALIZATION)
      layer.finalize_state()  # Keras computes with copies made from its variables
    if isinstance(layer, keras.layers.Dropout):  # top_dropout and stochastic depth ("drop")
      layer.rate = 0.0
  return reference


def keras_pixels_and_inputs(seed, size=KERAS_SIZE, batch=2):
  """Pixels in [0, 255] for Keras (which normalises inside) and our normalised inputs.

  Our inputs are what Keras' Rescaling + Normalization compute with the
  ImageNet statistics a weights=None model holds (no 1/sqrt(std) layer).
  """
  pixels = np.random.RandomState(seed).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
  ours = (pixels / np.float32(255) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
  return pixels, ours.astype(np.float32)


@pytest.fixture(name="b0_file", scope="module")
def fixture_b0_file(tmp_path_factory):
  reference = torchvision_reference("efficientnet_b0")
  path = tmp_path_factory.mktemp("efficientnet") / "efficientnet_b0.pth"
  torch.save(reference.state_dict(), path)
  return reference, str(path)


# ----------------------------------------------------------------------------
# torchvision parity
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", by_run_set(TORCHVISION_NAMES, DEFAULT_RUN, SLOW_RUN[:1]))
def test_torchvision_parity(name, tmp_path, b0_file):
  if name == "efficientnet_b0":
    reference, path = b0_file
  else:
    reference = torchvision_reference(name)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
  model = models.get_model(name, dropout_rate=0.0)
  assert parameter_count(model) == sum(p.numel() for p in reference.parameters())
  variables = weights.load(name, path, source="torchvision")

  images = np.random.RandomState(1).randn(2, 3, TORCH_SIZE, TORCH_SIZE).astype(np.float32)
  reference.eval()
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  actual = model.apply(variables, to_nhwc(images), train=False)
  error = relative_error(actual, expected)
  assert error < INFERENCE_TOLERANCE
  error64 = assert_inference_parity_in_float64(reference, model, variables, images)
  train = assert_train_mode_parity(reference, model, variables, TORCH_SIZE)
  report_parity(name, "torchvision", inference32=error, inference64=error64, **train)


@pytest.mark.parametrize("name", ["efficientnet_b5", "efficientnet_v2_s", "efficientnet_b0"])
def test_batchnorm_settings_are_torchvisions(name):
  reference = getattr(torchvision.models, name)()
  bn = next(m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d))
  model = models.get_model(name)
  assert model.bn_epsilon == bn.eps
  assert model.bn_momentum == pytest.approx(1.0 - bn.momentum)


# ----------------------------------------------------------------------------
# Keras parity
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", by_run_set(KERAS_NAMES, slow=SLOW_RUN[1:]))
def test_keras_parity(name, tmp_path, monkeypatch):
  reference = keras_reference(name, classes=10)
  # By type: a second model of the session numbers it normalization_1.
  normalization = sum(int(np.size(w)) for layer in reference.layers
                      if isinstance(layer, keras.layers.Normalization) for w in layer.weights)
  model = models.get_model(name, num_classes=10, dropout_rate=0.0)
  assert parameter_count(model) == sum(int(np.size(w)) for w in reference.trainable_weights)
  assert parameter_count(model, "batch_stats") == sum(
      int(np.size(w)) for w in reference.non_trainable_weights) - normalization
  variables = load_each_layout_in_turn(name, reference, tmp_path)
  pixels, inputs = keras_pixels_and_inputs(seed=1)

  expected = np.asarray(reference(pixels, training=False))
  error = relative_error(model.apply(variables, inputs, train=False), expected)
  assert error < INFERENCE_TOLERANCE

  expected = keras_train_mode(reference, pixels, monkeypatch, keep_updated_statistics=True)
  actual, state = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
  # Keras cannot run in float64: our own float32 error stands in for its.
  bound = float32_train_bound(float32_conditioning(model, variables, inputs))
  train_error = relative_error(actual, expected)
  report_parity(name, "keras", inference32=error, train32=train_error, train32_bound=bound)
  assert train_error < bound
  reference.save_weights(tmp_path / "after.weights.h5")
  updated = weights.load(name, tmp_path / "after.weights.h5", source="keras")
  (tmp_path / "after.weights.h5").unlink()
  assert max_leaf_error(state["batch_stats"], updated["batch_stats"]) < INFERENCE_TOLERANCE


def test_keras_preprocessing_is_the_imagenet_models_own():
  """Our preprocessing equals the layers keras.applications puts before stem_conv.

  With `weights="imagenet"` Keras builds Rescaling(1/255), Normalization
  (the file's ImageNet statistics) and Rescaling(1/sqrt(std)); the entry's
  `Preprocessing` must compute the same from 8-bit pixels.
  """
  pixels = np.random.RandomState(5).randint(0, 256, (2, 8, 8, 3)).astype(np.uint8)
  keras_input = keras.layers.Rescaling(1.0 / 255.0)(pixels.astype(np.float32))
  normalization = keras.layers.Normalization(axis=-1, mean=IMAGENET_NORMALIZATION[0],
                                             variance=IMAGENET_NORMALIZATION[1])
  keras_input = keras.layers.Rescaling([1.0 / np.sqrt(s) for s in IMAGENET_STD])(
      normalization(keras_input))
  for variant in "01234567":
    preprocessing = registry.get(f"keras_efficientnet_b{variant}.in1k").preprocessing
    ours = images_lib.normalize(pixels, preprocessing)
    assert relative_error(ours, np.asarray(keras_input)) < 1e-6


def test_keras_file_with_other_normalization_is_refused(tmp_path):
  import h5py  # pylint: disable=import-outside-toplevel
  with h5py.File(tmp_path / "weights.h5", "w") as f:
    f.attrs["layer_names"] = [b"normalization"]
    f.create_group("normalization").attrs["weight_names"] = [
        b"normalization/mean:0", b"normalization/variance:0", b"normalization/count:0"]
    f["normalization/normalization/mean:0"] = np.zeros(3, np.float32)
    f["normalization/normalization/variance:0"] = np.ones(3, np.float32)
    f["normalization/normalization/count:0"] = np.zeros((), np.int64)
  with pytest.raises(WeightsError, match="input Normalization layer holds mean"):
    weights.load("keras_efficientnet_b0", tmp_path / "weights.h5", source="keras")


def test_wrong_source_or_architecture_is_a_clear_error(b0_file, tmp_path):
  _, path = b0_file
  with pytest.raises(WeightsError, match="takes torchvision weights only.*'keras_efficientnet_b0'"):
    weights.load("efficientnet_b0", path, source="keras")
  with pytest.raises(WeightsError, match="takes keras weights only"):
    weights.load("keras_efficientnet_b0", path, source="torchvision")
  with pytest.raises(WeightsError, match="takes torchvision weights only"):
    weights.load("efficientnet_b0", path, source="timm")
  with pytest.raises(WeightsError, match="do not fit model 'efficientnet_b1'"):
    weights.load("efficientnet_b1", path, source="torchvision")
  resnet = torchvision.models.resnet18()
  torch.save(resnet.state_dict(), tmp_path / "r18.pth")
  with pytest.raises(WeightsError, match="no place in a EfficientNet: conv1.weight"):
    weights.load("efficientnet_b0", tmp_path / "r18.pth", source="torchvision")


# ----------------------------------------------------------------------------
# The backbone contract
# ----------------------------------------------------------------------------

def test_stages_follow_the_publishers_boundaries():
  b0 = models.get_model("efficientnet_b0")
  assert b0.stage_names == ("stem",) + tuple(f"stage{i}" for i in range(1, 8)) + ("top",)
  assert models.get_model("efficientnet_v2_s").stage_names[-2:] == ("stage6", "top")
  # torchvision's features[i] is our i-th stage (features[0] the stem, the last `top`).
  names = dict(efficientnet_weights.names_for_torchvision(b0))
  assert names[r"features\.0\.0"] == "stem/conv" and names[r"features\.8\.0"] == "top/conv"
  assert names[r"features\.6\.(\d+)\.block\.1\.0"] == "stage6/block{0+}/dwconv"
  keras_names = {k: v for k, v, _ in efficientnet_weights.layers_for_keras(
      models.get_model("keras_efficientnet_b0"))}
  assert keras_names["block6d_dwconv"] == "stage6/block4/dwconv"
  assert keras_names["top_bn"] == "top/bn"


def test_features_truncation_input_stage_and_dtypes(b0_file):
  _, path = b0_file
  variables = weights.load("efficientnet_b0", path, source="torchvision")
  model = models.get_model("efficientnet_b0")
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  features = models.extract_features(model, variables, images)
  assert list(features) == list(model.stage_names) + ["pre_logits", "logits"]
  assert features["stage3"].shape == (2, 4, 4, 40) and features["top"].shape == (2, 1, 1, 1280)

  # The stages after stage3, fed stage3's output, give the same logits.
  rest = model.clone(input_stage="stage3")
  np.testing.assert_allclose(rest.apply(variables, features["stage3"]), features["logits"],
                             rtol=1e-5, atol=1e-5)
  head_free = models.get_model("efficientnet_b0", num_classes=None)
  pooled = head_free.apply({k: {n: v for n, v in c.items() if n != "head"}
                            for k, c in variables.items()}, images)
  np.testing.assert_allclose(pooled, features["pre_logits"], rtol=1e-5, atol=1e-5)

  bf16 = models.get_model("efficientnet_b0", dtype="bfloat16")
  logits = bf16.apply(variables, images)
  assert logits.dtype == jnp.float32
  assert relative_error(logits, features["logits"]) < 0.1  # bfloat16 keeps ~3 digits


def test_freezing_rules_and_frozen_batchnorm(b0_file):
  _, path = b0_file
  variables = weights.load("efficientnet_b0", path, source="torchvision")
  model = models.get_model("efficientnet_b0", dropout_rate=0.0)
  rules = freeze.rules_from_spec("depth:3", model.stage_names)
  multipliers = freeze.compile_rules(rules, variables["params"]).path_multiplier
  assert {k.split("/")[0] for k, v in multipliers.items() if v == 0} == {
      "stem", "stage1", "stage2", "stage3"}
  assert multipliers["head/kernel"] == 1 and multipliers["top/conv/kernel"] == 1

  frozen = model.clone(frozen_batchnorm=(r"(stem|stage1)/.*",))
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  _, state = frozen.apply(variables, images, train=True, mutable=["batch_stats"])
  stats, before = tree.flatten(state["batch_stats"]), tree.flatten(variables["batch_stats"])
  for key, value in stats.items():
    same = np.array_equal(value, before[key])
    assert same == (key.split("/")[0] in ("stem", "stage1")), key


def test_stochastic_depth_is_training_only_and_off_by_default(b0_file):
  _, path = b0_file
  variables = weights.load("efficientnet_b0", path, source="torchvision")
  images = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
  plain = models.get_model("efficientnet_b0", dropout_rate=0.0)
  dropping = plain.clone(stochastic_depth_rate=0.5)
  assert models.get_model("efficientnet_b0").stochastic_depth_rate == 0.0
  rngs = {"dropout": jax.random.key(3)}
  np.testing.assert_array_equal(dropping.apply(variables, images),
                                plain.apply(variables, images))
  train = lambda m: m.apply(variables, images, train=True, mutable=["batch_stats"],
                            rngs=rngs)[0]
  assert not np.allclose(train(dropping), train(plain))
  with pytest.raises(ValueError, match="stochastic_depth_rate=1.5"):
    plain.clone(stochastic_depth_rate=1.5).apply(variables, images)


def test_registry_entries():
  ids = registry.list_ids()
  for name in TORCHVISION_NAMES:
    assert f"{name}.tv_in1k" in ids
  assert "efficientnet_b1.tv2_in1k" in ids
  b0 = registry.get("efficientnet_b0.tv_in1k")
  assert b0.url == "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth"
  assert str(b0.hash) == "sha256 starting with 7f5810bc" and b0.reported_top1 == 77.692
  assert b0.preprocessing == Preprocessing(crop_size=224, resize_size=256,
                                           interpolation="bicubic")
  assert registry.get("efficientnet_v2_l.tv_in1k").preprocessing.mean == (0.5, 0.5, 0.5)
  keras_b0 = registry.get("keras_efficientnet_b0.in1k")
  assert keras_b0.url == "https://storage.googleapis.com/keras-applications/efficientnetb0.h5"
  assert str(keras_b0.hash) == "md5 902e53a9f72be733fc0bcb005b3ebbac"
  assert registry.get("keras_efficientnet_b7.in1k").preprocessing.crop_size == 600
  for entry_id in ids:
    if "efficientnet" in entry_id:
      assert registry.get(entry_id).class_names == "imagenet1k"


# ----------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0", "keras_efficientnet_b0"])
def test_convert_classify_and_features_command_lines(name, b0_file, tmp_path, capsys):
  # pylint: disable=import-outside-toplevel
  from PIL import Image
  from tlflax.cli import classify as classify_cli
  from tlflax.cli import convert as convert_cli
  from tlflax.cli import features as features_cli
  from tlflax.data import digits
  from tlflax.inference import features

  if name.startswith("keras"):
    source, path = "keras", tmp_path / "model.weights.h5"
    keras_reference(name).save_weights(path)
  else:
    source, path = "torchvision", b0_file[1]
  checkpoint = str(tmp_path / "checkpoint")
  assert convert_cli.main(["--source", source, "--model", name, "--input", str(path),
                           "--output", checkpoint]) == 0
  count = parameter_count(models.get_model(name))
  assert f"{count:,} parameters" in capsys.readouterr().out

  image = tmp_path / "image.png"
  Image.fromarray(np.random.RandomState(0).randint(0, 256, (50, 70, 3), np.uint8)).save(image)
  assert classify_cli.main(["--weights", checkpoint, "--image_size", "32", "--top_k", "2",
                            str(image)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert str(image) in lines and len([l for l in lines if "%" in l]) == 2

  data_dir = digits.prepare("source", str(tmp_path / "tfds"))
  output = str(tmp_path / "features")
  assert features_cli.main([
      "--config", os.path.join(REPO, "configs", "digits.py"), "--output", output, "--stage", "stage3",
      "--splits", "eval", f"--config.data.data_dir={data_dir}",
      f"--config.model.name={name}", f"--config.init.weights={checkpoint}",
      "--config.init.source=tlflax", "--config.eval_batch_size=100"]) == 0
  assert f"Wrote stage3 features of {name}" in capsys.readouterr().out
  eval_x, _ = features.load(output, "eval")
  assert eval_x.shape == (180, 40)
