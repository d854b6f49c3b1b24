"""TensorFlow runs tensorflow-datasets on the CPU only, and its absence is explained.

TensorFlow is imported inside the tests, never at collection: importing
torchvision after TensorFlow crashes the process, and other test files import
torch when they are collected.
"""

import logging
import sys
import types

import ml_collections
import pytest

from tlflax.data import datasets, tensorflow_setup


def test_loading_data_leaves_tensorflow_only_the_cpus(tmp_path, monkeypatch):
  hidden = []
  hide_accelerators = tensorflow_setup.hide_accelerators
  monkeypatch.setattr(tensorflow_setup, "hide_accelerators",
                      lambda tf: hidden.append(tf) or hide_accelerators(tf))
  data_config = ml_collections.ConfigDict(dict(
      source="digits", name="source", data_dir=str(tmp_path), train_split="train",
      eval_split="test"))
  source = datasets.load_source(data_config, "eval")  # builds the dataset: TF runs ops
  assert len(source) > 0
  assert hidden, "the TFDS source did not go through tensorflow_setup.import_tfds"
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  assert tf.config.get_visible_devices("GPU") == []
  assert tf.config.get_visible_devices("TPU") == []
  assert tf.config.get_visible_devices() == tf.config.list_physical_devices("CPU")
  # Again, after TensorFlow started: a no-op, not an error.
  assert tensorflow_setup.import_tfds() is sys.modules["tensorflow_datasets"]
  assert tf.config.get_visible_devices() == tf.config.list_physical_devices("CPU")


def fake_tensorflow(devices, started=False):
  """A `tensorflow` stand-in whose config has these physical devices."""
  state = {"visible": list(devices), "calls": []}

  def set_visible_devices(chosen, device_type=None):
    state["calls"].append((list(chosen), device_type))
    if started and list(chosen) != state["visible"]:
      raise RuntimeError("Visible devices cannot be modified after being initialized")
    state["visible"] = list(chosen)

  config = types.SimpleNamespace(
      list_physical_devices=lambda kind=None: [d for d in devices
                                               if kind in (None, d.device_type)],
      set_visible_devices=set_visible_devices)
  return types.SimpleNamespace(config=config), state


DEVICES = [types.SimpleNamespace(name=f"/physical_device:{kind}:{i}", device_type=kind)
           for kind, i in (("CPU", 0), ("GPU", 0), ("GPU", 1), ("TPU", 0))]


def test_accelerators_are_hidden_before_tensorflow_starts():
  tf, state = fake_tensorflow(DEVICES)
  tensorflow_setup.hide_accelerators(tf)
  tensorflow_setup.hide_accelerators(tf)  # twice is fine
  assert [d.name for d in state["visible"]] == ["/physical_device:CPU:0"]


def test_tensorflow_started_with_gpus_is_a_warning_not_a_failure(caplog):
  tf, state = fake_tensorflow(DEVICES, started=True)
  with caplog.at_level(logging.WARNING, logger="tlflax.data.tensorflow_setup"):
    tensorflow_setup.hide_accelerators(tf)
  assert len(state["visible"]) == 4
  assert "may hold GPU memory that JAX needs" in caplog.text


def test_missing_tensorflow_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # what `import` sees when it is absent
  with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[tf\]"') as error:
    tensorflow_setup.import_tfds()
  assert "\n" not in str(error.value)
