"""Converted Keras weights compute what `keras.applications` computes.

Keras runs on JAX here (conftest sets KERAS_BACKEND). Every model is written
by Keras itself in its two HDF5 layouts (Keras 3 `.weights.h5` and the legacy
`.h5` of `model.save`), plus the layout of the published keras.applications
files (weights at the root, "name:0" weight names, Keras 1's names in the VGG
files), written by hand because Keras 3 no longer writes it. All must give
the same variables.

Training mode: Keras' BatchNorm computes `x * inv + (beta - mean * inv)`,
which cancels digits when a channel's batch mean is large next to its spread
(deep layers, small batches): against stock Keras the logits of keras_resnet152
differ by ~2e-3 relative, with either side's structure right. flax computes
`(x - mean) * inv + beta`. The training-mode references are therefore taken
from Keras with its BatchNorm formula rearranged to flax's order; the two then
agree to the last bit on CPU, which is what shows that the structure matches.
"""

import h5py
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from keras.src import backend as keras_backend

from conftest import (INFERENCE_TOLERANCE, by_run_set, float32_conditioning, float32_train_bound,
                      relative_error)
from tlflax import models, weights
from tlflax import tree
from tlflax.weights import WeightsError, merge

# Keras 3.15 converts its variables with np.array(x) thousands of times.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

TOLERANCE = INFERENCE_TOLERANCE
RESNET_SIZE = 64  # stage4 sees a 2x2 map: stride, padding and pooling all matter
CLASSES = 10

KERAS_RESNETS = {
    "keras_resnet50": keras.applications.ResNet50,
    "keras_resnet101": keras.applications.ResNet101,
    "keras_resnet152": keras.applications.ResNet152,
    "keras_resnet50v2": keras.applications.ResNet50V2,
    "keras_resnet101v2": keras.applications.ResNet101V2,
    "keras_resnet152v2": keras.applications.ResNet152V2,
}
KERAS_VGGS = {
    "keras_vgg16": keras.applications.VGG16,
    "keras_vgg19": keras.applications.VGG19,
}


# ----------------------------------------------------------------------------
# Building and saving reference models
# ----------------------------------------------------------------------------

def build_keras(constructor, seed=0, **options):
  """A keras.applications model returning logits, with every weight non-trivial."""
  keras.utils.set_random_seed(seed)
  model = constructor(weights=None, classifier_activation=None, **options)
  rng = np.random.RandomState(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.gamma.shape[0]
      layer.set_weights([rng.rand(n) + 0.5, rng.randn(n) * 0.2,
                         rng.randn(n) * 0.5, rng.rand(n) * 1.5 + 0.5])
    elif getattr(layer, "bias", None) is not None:  # Keras initialises biases to 0
      layer.bias.assign(rng.randn(*layer.bias.shape) * 0.1)
  return model


def save_applications_layout(model, path, keras1_names=False):
  """Writes weights as Keras 2's `save_weights("x.h5")` did, or Keras 1's.

  This is the layout of the published keras.applications files: `layer_names`
  at the root, byte strings, weight names like "conv1_conv/kernel:0" (each
  layer's written in reverse order, so the reader must go by name), or, as in
  the VGG files, Keras 1's "block1_conv1_W_1:0" in Keras' order.
  """
  keras1_suffix = {"kernel": "W", "bias": "b"}
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
    f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
    for layer in model.layers:
      group = f.create_group(layer.name)
      if keras1_names:
        names = [f"{layer.name}_{keras1_suffix[w.name]}_1:0" for w in layer.weights]
        variables = layer.weights
      else:
        names = [f"{layer.name}/{w.name}:0" for w in layer.weights][::-1]
        variables = layer.weights[::-1]
      group.attrs["weight_names"] = [n.encode() for n in names]
      for name, variable in zip(names, variables):
        group.create_dataset(name, data=np.asarray(variable))


def layout_savers(model):
  """{layout: (file name, function saving `model` to a path)} for every layout."""
  return {"keras3": ("model.weights.h5", model.save_weights),
          "legacy": ("model.h5", model.save),  # whole-model file: weights under "model_weights"
          "keras2_applications": ("applications.h5",
                                  lambda path: save_applications_layout(model, path))}


def save_all_layouts(model, directory, keras1_names=False):
  """Saves `model` in every layout (Keras 1 names for VGGs); returns {layout: path}."""
  paths = {}
  for layout, (filename, save) in layout_savers(model).items():
    paths[layout] = directory / filename
    save(paths[layout])
  if keras1_names:
    paths["keras1_applications"] = directory / "applications_keras1.h5"
    save_applications_layout(model, paths["keras1_applications"], keras1_names=True)
  return paths


def load_all_layouts(name, paths, **options):
  """Loads every layout, checks they agree exactly, returns the variables."""
  loaded = {layout: weights.load(name, path, source="keras", **options)
            for layout, path in paths.items()}
  first = tree.flatten(loaded["keras3"])
  for layout, variables in loaded.items():
    flat = tree.flatten(variables)
    assert flat.keys() == first.keys(), layout
    for key, value in flat.items():
      np.testing.assert_array_equal(value, first[key], err_msg=f"{layout}: {key}")
  return loaded["keras3"]


def load_each_layout_in_turn(name, model, directory, **options):
  """As `load_all_layouts(name, save_all_layouts(model, directory))`, one file at a time.

  Each layout is saved, loaded, compared with the first and deleted before
  the next is written, so a large network (EfficientNet-B7: 260 MB a file)
  never holds more than one file on a CI machine's disk.
  """
  first, variables = None, None
  for layout, (filename, save) in layout_savers(model).items():
    path = directory / filename
    save(path)
    loaded = weights.load(name, path, source="keras", **options)
    path.unlink()
    flat = tree.flatten(loaded)
    if first is None:
      first, variables = flat, loaded
      continue
    assert flat.keys() == first.keys(), layout
    for key, value in flat.items():
      np.testing.assert_array_equal(value, first[key], err_msg=f"{layout}: {key}")
  return variables


def _subtract_first_batch_normalization(x, mean, variance, axis, offset=None, scale=None,
                                        epsilon=1e-3):
  """Keras' jax `batch_normalization`, computed as `(x - mean) * inv + offset`."""
  shape = [1] * x.ndim
  shape[axis] = mean.shape[0]
  inv = jax.lax.rsqrt(jnp.reshape(variance, shape) + epsilon)
  if scale is not None:
    inv = inv * jnp.reshape(scale, shape)
  y = (x - jnp.reshape(mean, shape)) * inv
  return y if offset is None else y + jnp.reshape(offset, shape)


def keras_train_mode(model, images, monkeypatch, keep_updated_statistics=False):
  """Keras' training-mode output, BatchNorm rearranged (see the module doc).

  A training-mode call moves every BatchNorm's moving statistics. They are
  put back unless `keep_updated_statistics` (for a test that compares them),
  so a later inference comparison with the same model (a module-scoped
  fixture, whichever test a worker runs first) still sees the saved weights.
  """
  saved = model.get_weights()
  try:
    with monkeypatch.context() as patch:
      patch.setattr(keras_backend.nn, "batch_normalization",
                    _subtract_first_batch_normalization)
      return np.asarray(model(images, training=True))
  finally:
    if not keep_updated_statistics:
      model.set_weights(saved)


def max_leaf_error(actual_tree, expected_tree):
  actual, expected = tree.flatten(actual_tree), tree.flatten(expected_tree)
  assert actual.keys() == expected.keys()
  return max(relative_error(actual[k], expected[k]) for k in actual)


# ----------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------

# keras_resnet50 and 50v2 by default; the deeper ones repeat their blocks
# (`pytest -m every_size`).
@pytest.mark.parametrize("name", by_run_set(sorted(KERAS_RESNETS),
                                            default=("keras_resnet50", "keras_resnet50v2")))
def test_keras_resnet_parity(name, tmp_path, monkeypatch):
  reference = build_keras(KERAS_RESNETS[name], classes=CLASSES,
                          input_shape=(RESNET_SIZE, RESNET_SIZE, 3))
  variables = load_each_layout_in_turn(name, reference, tmp_path)
  assert variables["params"]["head"]["kernel"].shape[-1] == CLASSES
  model = models.get_model(name, num_classes=CLASSES)
  images = np.random.RandomState(1).randn(2, RESNET_SIZE, RESNET_SIZE, 3).astype(np.float32)

  expected = np.asarray(reference(images, training=False))
  actual = model.apply(variables, images, train=False)
  assert relative_error(actual, expected) < TOLERANCE

  expected = keras_train_mode(reference, images, monkeypatch, keep_updated_statistics=True)
  actual, state = model.apply(variables, images, train=True, mutable=["batch_stats"])
  # Keras cannot run these models in float64, so our own float32 error stands
  # in for the reference's (the same function, conditioned alike).
  bound = float32_train_bound(float32_conditioning(model, variables, images))
  assert relative_error(actual, expected) < bound

  # Keras has now updated its moving statistics from the same batch.
  reference.save_weights(tmp_path / "after.weights.h5")
  updated = weights.load(name, tmp_path / "after.weights.h5", source="keras")
  assert max_leaf_error(state["batch_stats"], updated["batch_stats"]) < TOLERANCE


def test_keras_resnet_without_top(tmp_path):
  """An `include_top=False` file fits the head-less model, ending in post_bn + ReLU."""
  name = "keras_resnet50v2"
  reference = build_keras(KERAS_RESNETS[name], include_top=False, pooling="avg",
                          input_shape=(32, 32, 3))
  reference.save_weights(tmp_path / "notop.weights.h5")
  variables = weights.load(name, tmp_path / "notop.weights.h5", source="keras")
  model = models.get_model(name, num_classes=None)
  assert "head" not in variables["params"]
  shapes = {k: v.shape for k, v in tree.flatten(variables).items()}
  assert shapes == merge.model_shapes(model)

  images = np.random.RandomState(2).randn(2, 32, 32, 3).astype(np.float32)
  expected = np.asarray(reference(images, training=False))
  assert relative_error(model.apply(variables, images), expected) < TOLERANCE


@pytest.fixture(scope="module")
def vgg16_notop_files(tmp_path_factory):
  """Keras VGG16 without its top (a 64x64 input), saved in every layout.

  Returns:
    `(paths by layout, path of a .keras archive, images, Keras' output)`.
  """
  directory = tmp_path_factory.mktemp("keras_vgg16")
  reference = build_keras(keras.applications.VGG16, include_top=False, pooling="avg",
                          input_shape=(64, 64, 3))
  paths = save_all_layouts(reference, directory, keras1_names=True)
  reference.save(directory / "model.keras")
  images = np.random.RandomState(3).randn(2, 64, 64, 3).astype(np.float32)
  expected = np.asarray(reference(images, training=False))
  return paths, directory / "model.keras", images, expected


def test_keras_vgg_without_top(vgg16_notop_files):
  """A file without fc1/fc2/predictions fits the VGG truncated after stage5."""
  paths, _, images, expected = vgg16_notop_files
  variables = load_all_layouts("keras_vgg16", paths, last_stage="stage5")
  assert "fc" not in variables["params"] and "head" not in variables["params"]
  # load() recognises the missing top by itself.
  automatic = weights.load("keras_vgg16", paths["keras3"], source="keras")
  assert jax.tree.all(jax.tree.map(np.array_equal, automatic, variables))
  model = models.get_model("keras_vgg16", num_classes=None, last_stage="stage5")
  assert relative_error(model.apply(variables, images, train=False), expected) < TOLERANCE
  actual, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  assert relative_error(actual, expected) < TOLERANCE


@pytest.mark.parametrize("name", sorted(KERAS_VGGS))
def test_keras_vgg_with_top(name, tmp_path):
  """The whole VGG at the 224x224 input its top requires (a 7x7 map at fc1)."""
  reference = build_keras(KERAS_VGGS[name], classes=CLASSES)
  reference.save_weights(tmp_path / "vgg.weights.h5")
  variables = weights.load(name, tmp_path / "vgg.weights.h5", source="keras")
  model = models.get_model(name, num_classes=CLASSES)
  images = np.random.RandomState(4).randn(1, 224, 224, 3).astype(np.float32)
  expected = np.asarray(reference(images, training=False))
  assert relative_error(model.apply(variables, images), expected) < TOLERANCE


def test_keras_archive(vgg16_notop_files):
  """A Keras 3 `.keras` archive is read through the weights file inside it."""
  _, archive, images, expected = vgg16_notop_files
  variables = weights.load("keras_vgg16", archive, source="keras", last_stage="stage5")
  model = models.get_model("keras_vgg16", num_classes=None, last_stage="stage5")
  assert relative_error(model.apply(variables, images), expected) < TOLERANCE


# ----------------------------------------------------------------------------
# Files that cannot be used
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["keras3", "legacy"])
def test_truncated_file(vgg16_notop_files, layout, tmp_path):
  paths, _, _, _ = vgg16_notop_files
  truncated = tmp_path / "truncated.h5"
  truncated.write_bytes(paths[layout].read_bytes()[:1_000_000])
  with pytest.raises(WeightsError, match="truncated"):
    weights.load("keras_vgg16", truncated, source="keras")


def test_not_hdf5(tmp_path):
  (tmp_path / "weights.h5").write_bytes(b"certainly not HDF5")
  with pytest.raises(WeightsError, match="not an HDF5 file"):
    weights.load("keras_resnet50", tmp_path / "weights.h5", source="keras")


def test_hdf5_without_keras_weights(tmp_path):
  with h5py.File(tmp_path / "data.h5", "w") as f:
    f["images"] = np.zeros((2, 3))
  with pytest.raises(WeightsError, match="without Keras weights"):
    weights.load("keras_resnet50", tmp_path / "data.h5", source="keras")


@pytest.mark.parametrize("layout", ["keras3", "legacy", "keras2_applications",
                                    "keras1_applications"])
def test_file_of_another_architecture(vgg16_notop_files, layout):
  paths, _, _, _ = vgg16_notop_files
  with pytest.raises(WeightsError, match="no place in a keras_resnet50: block1_conv1"):
    weights.load("keras_resnet50", paths[layout], source="keras")


def test_v1_file_for_a_v2_model(tmp_path):
  """ResNet v1 and v2 share layer names; v1's BatchNorms have no place in v2."""
  with h5py.File(tmp_path / "v1.h5", "w") as f:
    f.attrs["layer_names"] = [b"conv1_bn"]
    f.create_group("conv1_bn").attrs["weight_names"] = [
        f"conv1_bn/{n}:0".encode() for n in ("gamma", "beta", "moving_mean", "moving_variance")]
    for n in ("gamma", "beta", "moving_mean", "moving_variance"):
      f[f"conv1_bn/conv1_bn/{n}:0"] = np.ones(64, np.float32)
  with pytest.raises(WeightsError, match="no place in a keras_resnet50v2: conv1_bn"):
    weights.load("keras_resnet50v2", tmp_path / "v1.h5", source="keras")


def test_layer_with_wrong_number_of_weights(tmp_path):
  with h5py.File(tmp_path / "short.h5", "w") as f:
    f.attrs["layer_names"] = [b"conv1_bn"]
    f.create_group("conv1_bn").attrs["weight_names"] = [b"conv1_bn/gamma:0",
                                                        b"conv1_bn/beta:0"]
    f["conv1_bn/conv1_bn/gamma:0"] = np.ones(64, np.float32)
    f["conv1_bn/conv1_bn/beta:0"] = np.zeros(64, np.float32)
  with pytest.raises(WeightsError, match="'conv1_bn' has 2 weights; expected 4"):
    weights.load("keras_resnet50", tmp_path / "short.h5", source="keras")


def test_keras3_file_without_layer_names(tmp_path):
  """Keras 3 versions before layer-name metadata cannot be mapped by name."""
  with h5py.File(tmp_path / "old.weights.h5", "w") as f:
    f["layers/conv2d/vars/0"] = np.zeros((7, 7, 3, 64), np.float32)
  with pytest.raises(WeightsError, match="does not record Keras layer names"):
    weights.load("keras_resnet50", tmp_path / "old.weights.h5", source="keras")


def test_keras_file_for_a_torchvision_model(vgg16_notop_files):
  paths, _, _, _ = vgg16_notop_files
  with pytest.raises(WeightsError, match="no Keras layout"):
    weights.load("resnet50", paths["keras3"], source="keras")
