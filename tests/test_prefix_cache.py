"""The frozen-prefix cache (prefix_cache.py): the same training, the prefix computed once."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# test_stages imports torch before TensorFlow loads (see test_train.py).
from test_stages import SMALL
from test_train import load_config
from tlflax import freeze, models, training
from tlflax.training import checkpoint, prefix_cache
from tlflax.tree import flatten


def test_prefix_cache_matches_the_uncached_run(tmp_path):
  def config(enabled):
    c = load_config("digits.py", *SMALL, "--config.freeze.rules=depth:2",
                    "--config.num_train_steps=3", "--config.data.augment=none")
    c.prefix_cache.enabled = enabled
    c.prefix_cache.directory = str(tmp_path / "cache")
    return c
  cached = training.train_and_evaluate(config(True), str(tmp_path / "cached"))
  plain = training.train_and_evaluate(config(False), str(tmp_path / "plain"))
  entries = os.listdir(tmp_path / "cache")
  infos = [json.load(open(tmp_path / "cache" / e / "info.json")) for e in entries]
  assert sorted((i["stage"], i["split"]) for i in infos) == [("stage2", "eval"),
                                                            ("stage2", "train")]
  a = flatten(checkpoint.restore_params_only(str(tmp_path / "cached")))
  b = flatten(checkpoint.restore_params_only(str(tmp_path / "plain")))
  for path in b:
    np.testing.assert_allclose(a[path], b[path], rtol=1e-4, atol=1e-5, err_msg=path)
  assert cached["eval/accuracy"] == pytest.approx(plain["eval/accuracy"], abs=1 / 180)
  assert cached["eval/loss"] == pytest.approx(plain["eval/loss"], rel=1e-4)


def test_prefix_cache_is_keyed_by_weights_and_reuses_shallower_stages(tmp_path):
  config = load_config("digits.py", *SMALL, "--config.data.augment=none")
  from tlflax import data  # pylint: disable=import-outside-toplevel
  dataset = data.build(config.data, "eval", training=False, global_batch_size=32)
  model = models.get_model("cifar_resnet20", num_classes=5)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  directory = str(tmp_path)

  def outputs(variables, stage):
    return prefix_cache.prefix_outputs("cifar_resnet20", model, variables, dataset, config.data,
                                       "eval", stage, 32, directory, progress=False)

  stage1, labels, hit = outputs(variables, "stage1")
  assert not hit and stage1.shape == (dataset.num_examples, 32, 32, 16)
  np.testing.assert_array_equal(labels, np.concatenate(
      [b["label"][b["mask"] > 0] for b in dataset.batches()]))
  assert outputs(variables, "stage1")[2]  # the same request reads the cache
  # Stage 2 starts from the cached stage 1 and equals a direct computation.
  stage2, _, hit = outputs(variables, "stage2")
  assert not hit
  (entry,) = [e for e in os.listdir(directory)
              if json.load(open(os.path.join(directory, e, "info.json")))["stage"] == "stage2"]
  assert json.load(open(os.path.join(directory, entry, "info.json")))["computed_from"] == "stage1"
  first = next(dataset.batches())
  direct = models.extract_features(model, variables, dataset.device_transform()(first["image"]),
                                   ["stage2"])["stage2"]
  rows = int(first["mask"].sum())
  np.testing.assert_allclose(stage2[:rows], np.asarray(direct)[:rows], rtol=1e-5, atol=1e-5)
  # Other weights in the prefix: a new key, never the stale entry.
  changed = jax.tree.map(lambda x: x, variables)
  changed["params"]["stage1"]["block1"]["conv1"]["kernel"] *= 1.5
  other, _, hit = outputs(changed, "stage1")
  assert not hit and not np.allclose(other, stage1)
  # Weights after the prefix do not matter: the head is not part of stage 1's key.
  head_changed = jax.tree.map(lambda x: x, variables)
  head_changed["params"]["head"]["kernel"] += 1.0
  assert outputs(head_changed, "stage1")[2]
  # Model options change what a prefix computes (inception_v3's transform_input):
  # they enter the key.
  assert not prefix_cache.prefix_outputs(
      "cifar_resnet20", model, variables, dataset, config.data, "eval", "stage1", 32,
      directory, progress=False, model_options="transform_input=False")[2]


def test_frozen_prefix_finds_the_deepest_frozen_stage():
  model = models.get_model("cifar_resnet20", num_classes=5)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  names = model.stage_names

  def prefix(spec, mode="frozen_layers"):
    rules = freeze.rules_from_spec(spec, names)
    return prefix_cache.frozen_prefix(model, freeze.compile_rules(rules, params, mode), params)

  assert prefix("depth:2") == "stage2"
  assert prefix("linear_probe") == "stage3"
  assert prefix("depth:0") == "stem"
  assert prefix("none") is None
  assert prefix("surgical:stage2") == "stage1"
  assert prefix("depth:2", mode="none") is None  # frozen layers' statistics would adapt


def test_a_file_that_fails_to_decode_is_refused_and_no_entry_is_written(tmp_path, capsys):
  """A prefix cache holds a row for every example: with data.skip_bad_files
  it refuses (one line saying what to do) instead of writing a short entry."""
  from test_data import write_jpeg_folder  # pylint: disable=import-outside-toplevel
  from tlflax.cli import train as train_cli  # pylint: disable=import-outside-toplevel
  root = write_jpeg_folder(tmp_path / "images", cut=["val/dog/1.jpg"], per_class=(4, 3))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cache = tmp_path / "cache"
  status = train_cli.main([
      f"--config={repo}/configs/digits.py", "--config.num_train_steps=2",
      "--config.batch_size=8", "--config.eval_batch_size=8", "--config.data.source=folder",
      f"--config.data.path={root}", "--config.data.train_split=train",
      "--config.data.eval_split=val", "--config.data.augment=none",
      "--config.data.num_workers=0", "--config.data.skip_bad_files=True",
      "--config.freeze.rules=depth:2", "--config.prefix_cache.enabled=True",
      f"--config.prefix_cache.directory={cache}", f"--workdir={tmp_path}/run"])
  assert status == 1
  errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
  assert errors == [
      f"tlflax.main: error: The prefix cache needs every example, but {root}/val/dog/1.jpg "
      "fails to decode (data.skip_bad_files=True skips it). Replace or remove the file, or set "
      "config.prefix_cache.enabled=False to train from the images, skipping it."]
  # The train split's entry (every file decodes) is written first; nothing of
  # the eval split, not even a staging directory.
  entries = os.listdir(cache)
  assert all(os.path.exists(cache / e / "info.json") for e in entries), entries
  assert [json.load(open(cache / e / "info.json"))["split"] for e in entries] == ["train"]
