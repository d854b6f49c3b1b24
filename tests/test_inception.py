"""Inception-v3 (models/inception.py, weights/inception.py) against torchvision and Keras.

References are the real libraries with random weights and BatchNorm
statistics, at 75 px, the smallest input the unpadded convolutions allow
(Mixed_7a then sees a 3x3 map, so every stride, padding and pool matters).
"""

import copy
import logging

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import torch
import torchvision

from conftest import (FLOAT64_TOLERANCE, INFERENCE_TOLERANCE, float32_conditioning,
                      float32_train_bound, relative_error, report_parity)
from test_freeze import frozen_top_level
from test_keras_parity import (keras_train_mode, load_all_layouts, save_all_layouts,
                               save_applications_layout)
from test_torchvision_parity import no_dropout, randomize_batchnorm, to_nhwc
from tlflax import freeze, models, tree, weights
from tlflax.cli import classify as classify_cli
from tlflax.cli import convert as convert_cli
from tlflax.models import inception
from tlflax.weights import WeightsError, merge

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

SIZE = inception.InceptionV3.min_input_size  # 75
CLASSES = 10


def apply_jit(model, variables, images, train=False):
  """`model.apply` compiled once: op-by-op dispatch of ~100 convolutions is slower."""
  if train:
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])(
        variables, images)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


def apply_in_float64(model, variables, images_nchw, train=False):
  """Our model wholly in float64 (parameters, statistics, compute), compiled."""
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    out = apply_jit(model.clone(dtype=jnp.float64), variables,
                    jnp.asarray(images_nchw.transpose(0, 2, 3, 1), jnp.float64), train)
    assert out.dtype == jnp.float64
    return np.asarray(out)


class LogitsOnly(torch.nn.Module):
  """torchvision's Inception3 returning the main logits in training mode too.

  In training it returns `InceptionOutputs(logits, aux_logits)`; the
  auxiliary classifier is not part of tlflax's model (see models/inception.py).
  """

  def __init__(self, network):
    super().__init__()
    self.network = network

  def forward(self, x):
    out = self.network(x)
    return out.logits if isinstance(out, tuple) else out


@pytest.fixture(name="torch_file", scope="module")
def fixture_torch_file(tmp_path_factory):
  """A torchvision inception_v3 as built for its weights (aux classifier, transform_input)."""
  torch.manual_seed(0)
  reference = torchvision.models.inception_v3(weights=None, aux_logits=True,
                                              transform_input=True, init_weights=True,
                                              num_classes=CLASSES)
  randomize_batchnorm(reference)
  reference.eval()
  path = tmp_path_factory.mktemp("inception") / "inception_v3_random.pth"
  torch.save(reference.state_dict(), path)
  return reference, str(path)


def test_torchvision_inference_parity(torch_file, caplog):
  reference, path = torch_file
  with caplog.at_level(logging.WARNING, logger="tlflax.weights.inception"):
    variables = weights.load("inception_v3", path, source="torchvision")
  # The auxiliary classifier is explained, not an error.
  assert "left out 14 AuxLogits tensors" in caplog.text and "auxiliary" in caplog.text
  model = models.get_model("inception_v3", num_classes=CLASSES)
  images = np.random.RandomState(1).randn(2, 3, SIZE, SIZE).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  actual = apply_jit(model, variables, to_nhwc(images))
  error = relative_error(actual, expected)
  with torch.no_grad():
    exact = copy.deepcopy(reference).double()(torch.from_numpy(images).double()).numpy()
  error64 = relative_error(apply_in_float64(model, variables, images), exact)
  report_parity("inception_v3", "torchvision", inference32=error, inference64=error64)
  assert error < INFERENCE_TOLERANCE and error64 < FLOAT64_TOLERANCE


@pytest.mark.slow
def test_transform_input_equals_the_minus_one_to_one_scaling(torch_file):
  """transform_input=True on ImageNet-normalised pixels is (pixels - 0.5) / 0.5 without it."""
  reference, path = torch_file
  variables = weights.load("inception_v3", path, source="torchvision")
  pixels = np.random.RandomState(5).rand(2, SIZE, SIZE, 3)
  mean, std = np.asarray(inception.IMAGENET_MEAN), np.asarray(inception.IMAGENET_STD)
  with jax.enable_x64(True):
    variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    model = models.get_model("inception_v3", num_classes=CLASSES, dtype=jnp.float64)
    torchvision_way = apply_jit(model, variables64, jnp.asarray((pixels - mean) / std))
    plain = apply_jit(model.clone(transform_input=False), variables64,
                      jnp.asarray((pixels - 0.5) / 0.5))
    assert relative_error(plain, torchvision_way) < FLOAT64_TOLERANCE
  del reference


@pytest.mark.slow
def test_torchvision_train_mode_parity(torch_file):
  reference, path = torch_file
  network = copy.deepcopy(reference)
  # At 75 px Mixed_6e's map (3x3) is smaller than the auxiliary classifier's
  # 5x5 pool, so torchvision cannot run it in training; tlflax has no such branch.
  network.AuxLogits = None
  reference = LogitsOnly(network)
  no_dropout(reference)
  variables = weights.load("inception_v3", path, source="torchvision")
  model = models.get_model("inception_v3", num_classes=CLASSES, dropout_rate=0.0)
  images = np.random.RandomState(2).randn(4, 3, SIZE, SIZE).astype(np.float32)
  reference.train()
  with torch.no_grad():
    expected32 = reference(torch.from_numpy(images)).numpy()
    exact = reference.double()(torch.from_numpy(images).double()).numpy()
  actual = apply_jit(model, variables, to_nhwc(images), train=True)
  bound = float32_train_bound(relative_error(expected32, exact))
  error = relative_error(actual, exact)
  error64 = relative_error(apply_in_float64(model, variables, images, train=True), exact)
  report_parity("inception_v3", "torchvision", train32=error, train32_bound=bound,
                train64=error64)
  assert error < bound
  assert error64 < FLOAT64_TOLERANCE


def test_parameter_count_equals_torchvisions():
  without_aux = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                                init_weights=False)
  expected = sum(p.numel() for p in without_aux.parameters())
  assert count_parameters("inception_v3") == expected == 23_834_568


@pytest.mark.slow  # building a Keras InceptionV3 takes ~15 s
def test_parameter_count_equals_keras():
  reference = keras.applications.InceptionV3(weights=None, input_shape=(SIZE, SIZE, 3))
  expected = sum(int(np.prod(w.shape)) for w in reference.trainable_weights)
  assert count_parameters("keras_inception_v3") == expected == 23_817_352


def count_parameters(name):
  shapes = merge.model_shapes(models.get_model(name))
  return sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("params/"))


def test_a_torchvision_file_for_keras_and_back(torch_file, tmp_path):
  _, path = torch_file
  with pytest.raises(WeightsError, match="takes keras weights, not torchvision"):
    weights.load("keras_inception_v3", path, source="torchvision")
  with pytest.raises(WeightsError, match="takes torchvision weights, not timm"):
    weights.load("inception_v3", path, source="timm")
  state = torch.load(path, weights_only=True)
  state["Mixed_5b.branch1x1.extra.weight"] = torch.zeros(3)
  torch.save(state, tmp_path / "extra.pth")
  with pytest.raises(WeightsError, match="Mixed_5b.branch1x1.extra.weight"):
    weights.load("inception_v3", tmp_path / "extra.pth", source="torchvision")


# ----------------------------------------------------------------------------
# Keras
# ----------------------------------------------------------------------------

def build_keras_inception(seed=0, **options):
  """keras.applications.InceptionV3 returning logits, every weight non-trivial.

  As test_keras_parity's `build_keras`, for BatchNorms without gamma
  (`scale=False`): beta, moving mean and moving variance are randomised.
  """
  keras.utils.set_random_seed(seed)
  model = keras.applications.InceptionV3(weights=None, classifier_activation=None, **options)
  rng = np.random.RandomState(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.beta.shape[0]
      layer.set_weights([rng.randn(n) * 0.2, rng.randn(n) * 0.5, rng.rand(n) * 1.5 + 0.5])
    elif getattr(layer, "bias", None) is not None:
      layer.bias.assign(rng.randn(*layer.bias.shape) * 0.1)
  return model


@pytest.fixture(name="keras_files", scope="module")
def fixture_keras_files(tmp_path_factory):
  """Two Keras InceptionV3s of one session, the second's layers numbered conv2d_94...

  Returns:
    `(first model, its paths by layout, second model, its legacy .h5 paths)`.
  """
  directory = tmp_path_factory.mktemp("keras_inception")
  first = build_keras_inception(classes=CLASSES, input_shape=(SIZE, SIZE, 3))
  paths = save_all_layouts(first, directory)
  second = build_keras_inception(seed=1, classes=CLASSES, input_shape=(SIZE, SIZE, 3))
  second_dir = directory / "second"
  second_dir.mkdir()
  second_paths = {"legacy": second_dir / "model.h5",
                  "keras2_applications": second_dir / "applications.h5"}
  second.save(second_paths["legacy"])
  save_applications_layout(second, second_paths["keras2_applications"])
  return first, paths, second, second_paths


@pytest.mark.slow
def test_keras_inference_parity_in_every_layout(keras_files):
  first, paths, second, second_paths = keras_files
  model = models.get_model("keras_inception_v3", num_classes=CLASSES)
  images = np.random.RandomState(1).randn(2, SIZE, SIZE, 3).astype(np.float32)
  variables = load_all_layouts("keras_inception_v3", paths)
  assert "scale" not in variables["params"]["stem"]["conv2d_1a_3x3"]["bn"]
  error = relative_error(apply_jit(model, variables, images),
                         np.asarray(first(images, training=False)))
  report_parity("keras_inception_v3", "keras", inference32=error)
  assert error < INFERENCE_TOLERANCE
  # Layers named conv2d_94 ... conv2d_187: mapped by position all the same.
  numbers = [int(w.path.split("/")[0].rsplit("_", 1)[1]) for w in second.weights
             if w.path.startswith("conv2d_")]
  assert len(numbers) == 94 and min(numbers) >= 94, numbers[:3]
  expected = np.asarray(second(images, training=False))
  for layout, path in second_paths.items():
    variables = weights.load("keras_inception_v3", path, source="keras")
    assert relative_error(apply_jit(model, variables, images), expected) < INFERENCE_TOLERANCE, layout


@pytest.mark.slow
def test_keras_train_mode_parity(keras_files, monkeypatch):
  first, paths, _, _ = keras_files
  variables = weights.load("keras_inception_v3", paths["keras3"], source="keras")
  model = models.get_model("keras_inception_v3", num_classes=CLASSES)
  images = np.random.RandomState(2).randn(4, SIZE, SIZE, 3).astype(np.float32)
  expected = keras_train_mode(first, images, monkeypatch)
  actual = apply_jit(model, variables, images, train=True)
  # Keras cannot run in float64; our own float32 error stands in for its own.
  bound = float32_train_bound(float32_conditioning(model, variables, images))
  error = relative_error(actual, expected)
  report_parity("keras_inception_v3", "keras", train32=error, train32_bound=bound)
  assert error < bound


@pytest.mark.slow
def test_keras_file_without_top_fits_the_headless_model(tmp_path):
  reference = build_keras_inception(include_top=False, pooling="avg",
                                    input_shape=(SIZE, SIZE, 3))
  reference.save_weights(tmp_path / "notop.weights.h5")
  variables = weights.load("keras_inception_v3", tmp_path / "notop.weights.h5", source="keras")
  assert "head" not in variables["params"]
  model = models.get_model("keras_inception_v3", num_classes=None)
  images = np.random.RandomState(3).randn(1, SIZE, SIZE, 3).astype(np.float32)
  assert relative_error(apply_jit(model, variables, images),
                        np.asarray(reference(images, training=False))) < INFERENCE_TOLERANCE


@pytest.mark.slow
def test_keras_file_missing_a_layer_is_refused(keras_files, tmp_path):
  import h5py  # pylint: disable=import-outside-toplevel
  _, paths, _, _ = keras_files
  short = tmp_path / "short.h5"
  with h5py.File(paths["keras2_applications"], "r") as source, h5py.File(short, "w") as f:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in source.attrs["layer_names"]]
    # The last BatchNorm, whatever number this session's Keras gave it.
    dropped = [n for n in names if n.startswith("batch_normalization")][-1]
    names = [n for n in names if n != dropped]
    f.attrs["layer_names"] = [n.encode() for n in names]
    for name in names:
      source.copy(source[name], f, name)
  with pytest.raises(WeightsError, match="missing from the file"):
    weights.load("keras_inception_v3", short, source="keras")


# ----------------------------------------------------------------------------
# Every workflow: stages, freezing, truncation, prefix input, dtypes
# ----------------------------------------------------------------------------

def random_variables(name, seed=0):
  """Random weights and statistics of the right shapes (numpy, no init)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in merge.model_shapes(models.get_model(name)).items():
    if key.endswith("kernel"):
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif key.endswith(("scale", "var")):
      value = rng.uniform(0.5, 2.0, shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    flat[key] = value.astype(np.float32)
  return tree.unflatten(flat)


@pytest.mark.slow  # five compilations of the whole network
def test_stages_truncation_prefix_input_and_dtypes():
  name = "inception_v3"
  model = models.get_model(name)
  variables = random_variables(name)
  images = jnp.asarray(np.random.RandomState(4).randn(2, SIZE, SIZE, 3), jnp.float32)
  features = jax.jit(lambda v, x: models.extract_features(model, v, x))(variables, images)
  assert {k: v.shape[1:] for k, v in features.items()} == {
      "stem": (7, 7, 192), "stage1": (7, 7, 288), "stage2": (3, 3, 768),
      "stage3": (1, 1, 2048), "pre_logits": (2048,), "logits": (1000,)}
  # A model fed stage1's output (the prefix cache) computes the same logits.
  resumed = apply_jit(model.clone(input_stage="stage1"), variables, features["stage1"])
  np.testing.assert_allclose(resumed, features["logits"], rtol=1e-5, atol=1e-5)
  # Truncated without a head: the pooled stage2 map.
  truncated = models.get_model(name, num_classes=None, last_stage="stage2")
  pooled = apply_jit(truncated, variables, images)
  np.testing.assert_allclose(pooled, features["stage2"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  # bfloat16 compute, float32 out, features of the same network (8-bit mantissa
  # over ~50 layers: a few percent).
  headless = models.get_model(name, num_classes=None, dtype="bfloat16")
  low = apply_jit(headless, variables, images)
  assert low.dtype == jnp.float32 and low.shape == (2, 2048)
  assert relative_error(low, features["pre_logits"]) < 0.1


def test_freezing_rules_follow_the_mixed_groups():
  name = "keras_inception_v3"
  model = models.get_model(name)
  variables = random_variables(name)
  params, names = variables["params"], model.stage_names
  # depth:K freezes the stem and the first K stages.
  depth = freeze.compile_rules(freeze.rules_from_spec("depth:1", names), params)
  assert frozen_top_level(depth) == ["stage1", "stem"]
  surgical = freeze.compile_rules(freeze.rules_from_spec("surgical:stage2", names), params)
  assert sorted({p.split("/")[0] for p in surgical.trainable_paths}) == ["head", "stage2"]
  decay = freeze.compile_rules(freeze.rules_from_spec("lld:0.5", names), params)
  assert decay.path_multiplier["stage3/mixed_7c/branch_pool/conv/kernel"] == 0.5
  assert decay.path_multiplier["stem/conv2d_1a_3x3/conv/kernel"] == 0.5 ** 4
  # Frozen BatchNorms of the frozen stages keep their statistics in training.
  patterns = depth.frozen_batchnorm(variables["batch_stats"])
  images = jnp.asarray(np.random.RandomState(6).randn(2, SIZE, SIZE, 3), jnp.float32)
  frozen = model.clone(frozen_batchnorm=patterns, num_classes=None)
  _, state = jax.jit(lambda v, x: frozen.apply(v, x, train=True, mutable=["batch_stats"]))(
      {"params": {k: v for k, v in params.items() if k != "head"},
       "batch_stats": variables["batch_stats"]}, images)
  before, after = tree.flatten(variables["batch_stats"]), tree.flatten(state["batch_stats"])
  for key, value in after.items():
    unchanged = np.array_equal(value, before[key])
    assert unchanged == key.startswith(("stem/", "stage1/")), key


# ----------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------

def test_convert_and_classify_command_lines(torch_file, tmp_path, capsys):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  _, path = torch_file
  output = str(tmp_path / "ckpt")
  assert convert_cli.main(["--source", "torchvision", "--model", "inception_v3", "--input",
                           path, "--output", output]) == 0
  # 23,834,568 with torchvision's 1000 classes; the head here has 2048 x 10 + 10.
  assert "21,806,058 parameters, 10 classes" in capsys.readouterr().out
  image = tmp_path / "image.png"
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (90, 100, 3), np.uint8)).save(image)
  names = tmp_path / "names.txt"
  names.write_text("\n".join(f"class {i}" for i in range(CLASSES)) + "\n")
  assert classify_cli.main(["--weights", output, "--image_size", str(SIZE), "--top_k", "1",
                            "--class_names", str(names), str(image)]) == 0
  assert capsys.readouterr().out.splitlines()[-1].split()[-2] == "class"


def test_registry_entries_are_the_publishers():
  import inspect  # pylint: disable=import-outside-toplevel
  from keras.src.applications import inception_v3 as keras_source  # pylint: disable=import-outside-toplevel
  from tlflax.data import images  # pylint: disable=import-outside-toplevel
  from tlflax.weights import registry  # pylint: disable=import-outside-toplevel
  published = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
  transforms = published.transforms()
  entry = registry.get("inception_v3.tv_in1k")
  assert entry.url == published.url and entry.hash.hex_digest in published.url
  assert entry.reported_top1 == published.meta["_metrics"]["ImageNet-1K"]["acc@1"]
  assert entry.preprocessing == images.Preprocessing(
      crop_size=transforms.crop_size[0], resize_size=transforms.resize_size[0],
      interpolation=transforms.interpolation.value, mean=transforms.mean, std=transforms.std)
  # torchvision builds the model for these weights with transform_input=True, as we do.
  assert models.get_model("inception_v3").transform_input
  entry = registry.get("keras_inception_v3.in1k")
  assert entry.url == keras_source.WEIGHTS_PATH
  assert f'file_hash="{entry.hash.hex_digest}"' in inspect.getsource(keras_source)
  assert (entry.preprocessing.mean, entry.preprocessing.std) == (images.TF.mean, images.TF.std)
