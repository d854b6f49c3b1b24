"""Keras weight files (`keras.applications` ResNets and VGGs) -> tlflax variables.

Two HDF5 layouts are read, with h5py only (no Keras or TensorFlow needed):

* Keras 2 `.h5` (the published keras.applications files, some of them still
  written by Keras 1, `model.save_weights` in Keras 2, and `model.save("x.h5")`
  in any version): the layers are listed
  in the attribute `layer_names` of the root (weights-only files) or of the
  group `model_weights` (whole-model files); each layer group lists its
  datasets in the attribute `weight_names`, e.g. "conv1_conv/kernel:0".
* Keras 3 `.weights.h5` (`model.save_weights`), also inside a `.keras`
  archive: `layers/<class name>_<n>/vars/0..k`, with the Keras layer name in
  the `name` attribute of `vars` and the variables in creation order.

Each model family has one table from Keras layer names to our module paths.
Keras kernels are already HWIO (convolutions) and (in, out) (dense layers),
so nothing is transposed; BatchNorm's gamma/beta become `scale`/`bias` and its
moving statistics go to `batch_stats`. A file saved without the classifier
(`include_top=False`) gives a tree without `head`.
"""

from __future__ import annotations

import io
import re
import zipfile
from typing import Iterator

import h5py
import ml_dtypes
import numpy as np

from tlflax.models import get_model, keras_resnet, vgg
from tlflax.weights.merge import WeightsError
from tlflax.weights.reading import require_file

# What a Keras layer's variables become, in the order Keras creates them:
# (Keras variable name, our collection, our leaf name).
CONV = (("kernel", "params", "kernel"), ("bias", "params", "bias"))
DENSE = CONV
BATCH_NORM = (("gamma", "params", "scale"), ("beta", "params", "bias"),
              ("moving_mean", "batch_stats", "mean"),
              ("moving_variance", "batch_stats", "var"))

# How many variables each kind of layer may have (a convolution or dense
# layer may lack its bias; keras.applications' BatchNorms have all four).
_ALLOWED_COUNTS = {CONV: (1, 2), BATCH_NORM: (4,)}

# Keras layer name (regex) -> our module path, and the kind of layer. The
# group `conv_stage` is Keras' stage number: Keras counts the stem as conv1,
# so its conv2 is our stage1.
_BLOCK = r"conv(?P<conv_stage>\d)_block(?P<block>\d+)"
RESNET_V1_LAYERS = (
    (r"conv1_conv", "stem/conv", CONV),
    (r"conv1_bn", "stem/bn", BATCH_NORM),
    (_BLOCK + r"_0_conv", "stage{stage}/block{block}/shortcut_conv", CONV),
    (_BLOCK + r"_0_bn", "stage{stage}/block{block}/shortcut_bn", BATCH_NORM),
    (_BLOCK + r"_(?P<k>[123])_conv", "stage{stage}/block{block}/conv{k}", CONV),
    (_BLOCK + r"_(?P<k>[123])_bn", "stage{stage}/block{block}/bn{k}", BATCH_NORM),
    (r"predictions", "head", DENSE),
)
RESNET_V2_LAYERS = (
    (r"conv1_conv", "stem/conv", CONV),
    (_BLOCK + r"_preact_bn", "stage{stage}/block{block}/preact_bn", BATCH_NORM),
    (_BLOCK + r"_0_conv", "stage{stage}/block{block}/shortcut_conv", CONV),
    (_BLOCK + r"_(?P<k>[123])_conv", "stage{stage}/block{block}/conv{k}", CONV),
    (_BLOCK + r"_(?P<k>[12])_bn", "stage{stage}/block{block}/bn{k}", BATCH_NORM),
    # The final BatchNorm sits in our last stage (see tlflax.models.keras_resnet).
    (r"post_bn", "stage4/post_bn", BATCH_NORM),
    (r"predictions", "head", DENSE),
)
VGG_LAYERS = (
    (r"block(?P<stage>\d)_conv(?P<k>\d)", "stage{stage}/conv{k}", CONV),
    (r"fc1", "fc/dense1", DENSE),
    (r"fc2", "fc/dense2", DENSE),
    (r"predictions", "head", DENSE),
)


def layers_for(model_name: str):
  """The name table of the Keras family `model_name` belongs to."""
  model = get_model(model_name)
  if isinstance(model, keras_resnet.KerasResNet):
    return RESNET_V2_LAYERS if model.preact else RESNET_V1_LAYERS
  if isinstance(model, vgg.VGG) and not model.batch_norm:
    return VGG_LAYERS
  raise WeightsError(
      f"{model_name!r} has no Keras layout. Keras weights fit keras_resnet50/101/152, "
      "keras_resnet50v2/101v2/152v2, keras_vgg16 and keras_vgg19.")


# ----------------------------------------------------------------------------
# Reading the two HDF5 layouts
# ----------------------------------------------------------------------------

def read_keras_file(path: str) -> dict[str, list[tuple[str | None, np.ndarray]]]:
  """Reads every layer's weights from a Keras HDF5 file (or `.keras` archive).

  Args:
    path: a Keras 2 `.h5`, a Keras 3 `.weights.h5`, or a `.keras` archive.

  Returns:
    `{keras layer name: [(variable name, array), ...]}` for the layers that
    have weights, in file order. The variable name ("kernel", "gamma", ...,
    or Keras 1's "block1_conv1_W_1") is None where the file records only
    positions (Keras 3).

  Raises:
    WeightsError: not HDF5, truncated, or no Keras weights in it.
  """
  path = require_file(path)
  source = path
  if zipfile.is_zipfile(path):
    source = _weights_from_archive(path)
  elif not h5py.is_hdf5(path):
    raise WeightsError(f"{path!r} is not an HDF5 file, so not Keras weights (.h5 or "
                       ".weights.h5); it may be truncated or of another format.")
  try:
    with h5py.File(source, "r") as f:
      legacy = f["model_weights"] if "model_weights" in f else f
      if _has_attribute(legacy, "layer_names"):
        return dict(_read_keras2(legacy))
      if "layers" in f:
        return _read_keras3(f["layers"], path)
  except WeightsError:
    raise
  except (OSError, KeyError, ValueError) as e:  # h5py's errors for damaged files
    raise WeightsError(f"Could not read {path!r} as a Keras weight file; it may be "
                       f"truncated or damaged: {e}") from e
  raise WeightsError(
      f"{path!r} is an HDF5 file without Keras weights: it has neither a "
      "'layer_names' attribute (Keras 2 .h5) nor a 'layers' group (Keras 3 "
      ".weights.h5).")


def _weights_from_archive(path: str) -> io.BytesIO:
  """The `model.weights.h5` inside a Keras 3 `.keras` zip archive."""
  with zipfile.ZipFile(path) as archive:
    if "model.weights.h5" not in archive.namelist():
      raise WeightsError(f"{path!r} is a zip archive without model.weights.h5, so "
                         "not a .keras model file.")
    return io.BytesIO(archive.read("model.weights.h5"))


def _has_attribute(group: h5py.Group, name: str) -> bool:
  # Keras splits attributes over 64 KB into name0, name1, ...
  return name in group.attrs or f"{name}0" in group.attrs


def _string_list(group: h5py.Group, name: str) -> list[str]:
  """A Keras list-of-strings attribute, joined again if Keras split it."""
  if name in group.attrs:
    values = list(group.attrs[name])
  else:
    values, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
      values += list(group.attrs[f"{name}{chunk}"])
      chunk += 1
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _read_keras2(group: h5py.Group) -> Iterator[tuple[str, list]]:
  for layer_name in _string_list(group, "layer_names"):
    layer = group[layer_name]
    weights = []
    for weight_name in _string_list(layer, "weight_names"):
      # "conv1_conv/kernel:0" -> "kernel"
      variable = weight_name.rsplit("/", 1)[-1].split(":")[0]
      weights.append((variable, _array(layer[weight_name])))
    if weights:
      yield layer_name, weights


def _read_keras3(layers_group: h5py.Group, path: str) -> dict[str, list]:
  """Walks `layers/*/vars` (and nested models' `layers/*/layers/...`)."""
  found, unnamed = {}, []

  def walk(group):
    for entry in group.values():
      if not isinstance(entry, h5py.Group):
        continue
      variables = entry.get("vars")
      if isinstance(variables, h5py.Group) and len(variables):
        name = variables.attrs.get("name")
        if name is None:
          unnamed.append(entry.name)
        else:
          name = name.decode("utf8") if isinstance(name, bytes) else str(name)
          if name in found:
            raise WeightsError(f"{path!r} has two layers named {name!r}; tlflax reads "
                               "single keras.applications models only.")
          found[name] = [(None, _array(variables[k])) for k in sorted(variables, key=int)]
      if "layers" in entry:
        walk(entry["layers"])

  walk(layers_group)
  if unnamed:
    raise WeightsError(
        f"{path!r} does not record Keras layer names ({len(unnamed)} unnamed, e.g. "
        f"{unnamed[0]}), perhaps because an older Keras 3 wrote it. Load it into the "
        "keras.applications model and save it again with a recent Keras, or with "
        "model.save('model.h5').")
  if not found:
    raise WeightsError(f"{path!r} has a 'layers' group but no weights in it.")
  return found


def _array(dataset: h5py.Dataset) -> np.ndarray:
  value = np.asarray(dataset[()])
  if dataset.attrs.get("dtype") == "bfloat16":
    # Keras 3 stores bfloat16 as raw 2-byte values and says so in an attribute.
    value = value.view(ml_dtypes.bfloat16)
  return value.astype(np.float32)


# ----------------------------------------------------------------------------
# Renaming
# ----------------------------------------------------------------------------

def _module_path(template: str, match: re.Match) -> str:
  groups = match.groupdict()
  if "conv_stage" in groups:
    groups["stage"] = int(groups.pop("conv_stage")) - 1
  return template.format(**groups)


def convert_layers(keras_layers: dict[str, list], table, what: str) -> dict[str, np.ndarray]:
  """Renames Keras layers' weights with `table`.

  Args:
    keras_layers: from `read_keras_file`.
    table: `(regex over the Keras layer name, our path template, kind)` rows.
    what: the model, for error messages.

  Returns:
    Flat `{"params/stem/conv/kernel": array, "batch_stats/...": array, ...}`.
  """
  compiled = [(re.compile(pattern), template, kind) for pattern, template, kind in table]
  flat, unknown = {}, []
  for layer_name, weights in keras_layers.items():
    row = next(((m, t, k) for p, t, k in compiled if (m := p.fullmatch(layer_name))), None)
    if row is None:
      unknown.append(layer_name)
      continue
    match, template, kind = row
    path = _module_path(template, match)
    for variable, collection, leaf in _name_weights(layer_name, weights, kind):
      flat[f"{collection}/{path}/{leaf}"] = variable
  if unknown:
    raise WeightsError(
        f"{len(unknown)} Keras layers have no place in {what}: "
        + ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        + ". Is the file for another architecture?")
  return flat


def _name_weights(layer_name: str, weights: list, kind) -> list[tuple[np.ndarray, str, str]]:
  """Pairs a layer's arrays with our names.

  By Keras variable name where the file has the names Keras 2 and 3 use;
  otherwise by position, as Keras' own loader does: Keras 3 files record no
  names, and the published VGG files keep Keras 1's ("block1_conv1_W_1:0").
  """
  known = [keras_name for keras_name, _, _ in kind]
  # A kind not listed in _ALLOWED_COUNTS (a family's own) has all its variables.
  allowed = _ALLOWED_COUNTS.get(kind, (len(kind),))
  if len(weights) not in allowed:
    raise WeightsError(f"Keras layer {layer_name!r} has {len(weights)} weights; "
                       f"expected {' or '.join(map(str, allowed))} "
                       f"({', '.join(known)}).")
  names = [keras_name for keras_name, _ in weights]
  if not (set(names) <= set(known) and len(set(names)) == len(names)):
    names = known[:len(weights)]
  return [(value, *kind[known.index(keras_name)][1:])
          for keras_name, (_, value) in zip(names, weights)]


def number_by_creation(keras_layers: dict[str, list], base_names) -> dict[str, list]:
  """Renames Keras' automatically named layers `<base>_0, <base>_1, ...` in creation order.

  keras.applications leaves some layers unnamed (InceptionV3's convolutions,
  Xception's shortcuts); Keras then calls them `conv2d`, `conv2d_1`, ... in
  the order they are created, counting every such layer made earlier in the
  session (a second model starts at `conv2d_94`, and the published Keras 2
  files at `conv2d_1`). Sorting by that number and renaming by rank gives
  every file the same names, which a family's positional table maps.

  Args:
    keras_layers: from `read_keras_file`.
    base_names: Keras' base names, e.g. ("conv2d", "batch_normalization").

  Returns:
    The same layers, the automatically named ones renamed, the others kept.

  Examples:
    >>> sorted(number_by_creation({"conv2d_95": [], "conv2d_94": []}, ["conv2d"]))
    ['conv2d_0', 'conv2d_1']
  """
  renamed = {}
  for base in base_names:
    pattern = re.compile(rf"{re.escape(base)}(?:_(\d+))?")
    numbered = sorted((int(m.group(1) or 0), name) for name in keras_layers
                      if (m := pattern.fullmatch(name)))
    renamed.update({name: f"{base}_{rank}" for rank, (_, name) in enumerate(numbered)})
  return {renamed.get(name, name): weights for name, weights in keras_layers.items()}


def convert(model_name: str, path: str) -> dict[str, np.ndarray]:
  """Reads a Keras `.h5`, `.weights.h5` or `.keras` file for `model_name`.

  Args:
    model_name: a registered Keras-family model, e.g. "keras_resnet50".
    path: the weight file.

  Returns:
    Flat `{"params/...": array, "batch_stats/...": array}` in our names,
    without `head` when the file has no classifier.

  Raises:
    WeightsError: unreadable file, or layers that do not belong to the model.
  """
  table = layers_for(model_name)
  return convert_layers(read_keras_file(path), table, f"a {model_name}")
