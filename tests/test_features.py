"""The standalone feature extractor (features.py): numbers, padding, weights, files, errors."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax import build, data, freeze, models, optim, steps
from tlflax.training import checkpoint
from tlflax.inference import features
from tlflax.data import digits
from tlflax.weights.merge import WeightsError, model_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not a divisor of the 721 train or 180 test images: the last batch is padded.
BATCH = 64


@pytest.fixture(name="digits_dir", scope="module")
def fixture_digits_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  digits.prepare("source", path)
  return path


@pytest.fixture(name="run_dir", scope="module")
def fixture_run_dir(tmp_path_factory):
  """A training run's workdir (5 classes): loading it is quicker than a random init."""
  model = models.get_model("cifar_resnet20", num_classes=5)
  return save_workdir(tmp_path_factory.mktemp("run") / "digits",
                      trained_looking_variables(model, seed=2))


def digits_config(digits_dir, **init):
  """configs/digits.py reading the prepared data, with `init` keys set."""
  spec = importlib.util.spec_from_file_location("digits_config",
                                                os.path.join(REPO, "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.data_dir = digits_dir
  config.eval_batch_size = BATCH
  for key, value in init.items():
    setattr(config.init, key, value)
  config.lock()
  return config


def eval_dataset(config):
  return data.build(config.data, split="eval", training=False, global_batch_size=BATCH)


def trained_looking_variables(model, seed=1):
  """Random weights and BatchNorm statistics unlike a fresh init's.

  Filled by numpy from the traced shapes: running `model.init` on two shared
  cores takes seconds.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":  # fan-in scaling keeps activations O(1) through the network
      values = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      values = rng.uniform(0.5, 2.0, leaf.shape)
    else:  # bias, mean
      values = 0.1 * rng.standard_normal(leaf.shape)
    return values.astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def reference_features(model, variables, dataset, names):
  """`models.extract_features` of the whole model, batch by batch, padding dropped."""
  run = jax.jit(lambda variables, images: models.extract_features(model, variables, images,
                                                                  names))
  rows, labels = {name: [] for name in names}, []
  for batch in dataset.batches(epoch=0):
    real = batch["mask"] > 0
    for name, out in run(variables, dataset.device_transform()(batch["image"])).items():
      rows[name].append(np.asarray(out)[real])
    labels.append(batch["label"][real])
  return {name: np.concatenate(r) for name, r in rows.items()}, np.concatenate(labels)


def save_workdir(path, variables):
  """A training run's checkpoint holding `variables`, as train.py writes it."""
  freezing = freeze.compile_rules([(".*", "trainable")], variables["params"])
  tx = optim.make_optimizer({"name": "sgd", "learning_rate": 0.1}, freezing, total_steps=1)
  state = steps.create_train_state(variables, tx, freezing)
  with checkpoint.Checkpointer(str(path), async_save=False) as ckpt:
    ckpt.save(1, state)
  return str(path)


def test_extract_equals_extract_features_and_drops_padding(digits_dir):
  config = digits_config(digits_dir)
  dataset = eval_dataset(config)
  assert dataset.steps_per_epoch * BATCH > dataset.num_examples  # there is padding
  model = models.get_model("cifar_resnet20", num_classes=5)
  variables = trained_looking_variables(model)

  expected, expected_labels = reference_features(model, variables, dataset,
                                                 ["stage2", "logits"])
  maps, labels = features.extract(model, variables, dataset, "stage2", pool="none",
                                  progress=False)
  assert maps.shape == (dataset.num_examples, 16, 16, 32) and maps.dtype == np.float32
  np.testing.assert_allclose(maps, expected["stage2"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, expected_labels)
  np.testing.assert_array_equal(labels, dataset.source.labels()[dataset.example_ids])

  logits, _ = features.extract(model, variables, dataset, "logits", progress=False)
  assert logits.shape == (dataset.num_examples, 5)
  np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_a_body_stage_runs_a_truncated_model():
  model = models.get_model("cifar_resnet20", num_classes=5)
  assert models.feature_names(model) == ["stem", "stage1", "stage2", "stage3",
                                           "pre_logits", "logits"]
  truncated = models.model_for_stage(model, "stage2")
  names = {key.split("/")[1] for key in model_shapes(truncated)}
  assert names == {"stem", "stage1", "stage2"}  # no stage3, no head
  assert "head" not in {key.split("/")[1] for key in
                        model_shapes(models.model_for_stage(model, "pre_logits"))}
  vgg = models.get_model("vgg11", num_classes=None)
  assert models.feature_names(vgg)[-3:] == ["stage5", "fc", "pre_logits"]
  assert models.feature_names(model.clone(last_stage="stage1")) == [
      "stem", "stage1", "pre_logits", "logits"]


def test_weights_of_a_training_run_are_the_ones_used(digits_dir, tmp_path):
  model = models.get_model("cifar_resnet20", num_classes=5)
  variables = trained_looking_variables(model, seed=3)
  workdir = save_workdir(tmp_path / "run", variables)
  config = digits_config(digits_dir, weights=workdir, source="workdir")
  dataset = eval_dataset(config)

  expected, _ = reference_features(model, variables, dataset, ["pre_logits", "logits"])
  backbone = build.build_extractor(config, "stage3")
  assert backbone.start == "pretrained"
  got, _ = features.extract(backbone.model, backbone.variables, dataset, "stage3",
                            progress=False)
  # stage3 averaged over space is what the head sees.
  np.testing.assert_allclose(got, expected["pre_logits"], rtol=1e-5, atol=1e-5)

  backbone = build.build_extractor(config, "logits")  # the run's own 5-class head
  got, _ = features.extract(backbone.model, backbone.variables, dataset, "logits",
                            progress=False)
  np.testing.assert_allclose(got, expected["logits"], rtol=1e-5, atol=1e-5)


def test_unknown_stage_and_missing_weights_say_what_to_do(digits_dir, tmp_path):
  with pytest.raises(ValueError, match=r"Unknown stage 'stage7' for 'cifar_resnet20'; choose "
                                       r"one of stem, stage1, stage2, stage3, pre_logits"):
    build.build_extractor(digits_config(digits_dir), "stage7")
  config = digits_config(digits_dir, weights=str(tmp_path / "missing.pth"), source="torchvision")
  with pytest.raises(WeightsError, match="does not exist.*--config.init.weights"):
    build.build_extractor(config, "stage2")
  config = digits_config(digits_dir, weights=str(tmp_path / "no_run"), source="workdir")
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    build.build_extractor(config, "stage2")
  with pytest.raises(FileNotFoundError, match="No train features .* --splits train"):
    features.load(tmp_path, "train")


def test_output_of_another_extraction_is_refused_unless_overwrite(digits_dir, run_dir, tmp_path):
  config = digits_config(digits_dir, weights=run_dir, source="workdir")
  output = str(tmp_path / "out")
  features.extract_to_directory(config, output, "stage1", splits=["eval"], progress=False)
  with pytest.raises(FileExistsError, match=r"stage: 'stage1' -> 'stage2'.*--overwrite"):
    features.extract_to_directory(config, output, "stage2", splits=["eval"], progress=False)
  assert features.read_info(output)["extraction"]["stage"] == "stage1"

  info = features.extract_to_directory(config, output, "stage2", splits=["eval"],
                                       overwrite=True, progress=False)
  assert info["extraction"]["stage"] == "stage2"
  assert features.load(output, "eval")[0].shape == (180, 32)

  stray = tmp_path / "stray"
  stray.mkdir()
  np.save(stray / "eval_features.npy", np.zeros(3))
  with pytest.raises(FileExistsError, match="without an info.json"):
    features.extract_to_directory(config, str(stray), "stage2", splits=["eval"],
                                  progress=False)


def test_several_stages_in_one_pass_write_what_one_stage_at_a_time_writes(digits_dir, run_dir,
                                                                           tmp_path):
  config = digits_config(digits_dir, weights=run_dir, source="workdir")
  stages = ["stage3", "stem", "logits"]
  outputs = {stage: str(tmp_path / "pass" / stage) for stage in stages}
  infos = features.extract_to_directories(config, outputs, splits=["eval"], progress=False)
  for stage in stages:
    single = str(tmp_path / "single" / stage)
    alone = features.extract_to_directory(config, single, stage, splits=["eval"], progress=False)
    assert infos[stage]["extraction"] == alone["extraction"]
    assert infos[stage]["splits"]["eval"]["pass_stages"] == stages
    (together, labels), (expected, expected_labels) = (features.load(d, "eval")
                                                       for d in (outputs[stage], single))
    np.testing.assert_array_equal(labels, expected_labels)
    # One program for all stages vs one per stage: the same arithmetic fused
    # differently, so float32 rounding may differ (as in the tests above).
    np.testing.assert_allclose(together, expected, rtol=1e-5, atol=1e-5)
    # The directory is the same extraction: the one-stage call keeps it as it is.
    written = os.path.getmtime(os.path.join(outputs[stage], "eval_features.npy"))
    features.extract_to_directory(config, outputs[stage], stage, splits=["eval"], reuse=True,
                                  progress=False)
    assert os.path.getmtime(os.path.join(outputs[stage], "eval_features.npy")) == written
  seconds = {infos[s]["splits"]["eval"]["seconds"] for s in stages}
  assert len(seconds) == 1 and seconds.pop() > 0  # equal shares of the one pass

  with pytest.raises(ValueError, match=r"Unknown stage 'stage9'.*choose one of stem, stage1"):
    features.extract_to_directories(config, {"stage1": str(tmp_path / "a"),
                                             "stage9": str(tmp_path / "b")}, progress=False)
  assert not (tmp_path / "a").exists()


@pytest.fixture(name="cli_output", scope="module")
def fixture_cli_output(digits_dir, run_dir, tmp_path_factory):
  output = str(tmp_path_factory.mktemp("features") / "digits")
  result = subprocess.run(
      [sys.executable, "-m", "tlflax.cli.features", "--config", "configs/digits.py",
       "--output", output, "--stage", "stage2", f"--config.data.data_dir={digits_dir}",
       f"--config.init.weights={run_dir}", "--config.init.source=workdir",
       "--config.eval_batch_size=100"],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr
  assert "Wrote stage2 features of cifar_resnet20" in result.stdout
  return output


def test_command_line_writes_files_that_load_reads(cli_output):
  names = sorted(os.listdir(cli_output))
  assert names == ["eval_features.npy", "eval_labels.npy", "info.json",
                   "train_features.npy", "train_labels.npy"]
  train_x, train_y = features.load(cli_output, "train")
  eval_x, eval_y = features.load(cli_output, "eval")
  assert train_x.shape == (721, 32) and eval_x.shape == (180, 32)
  assert train_x.dtype == np.float32 and train_y.dtype == np.int32
  assert sorted(np.unique(eval_y)) == [0, 1, 2, 3, 4]
  with open(os.path.join(cli_output, "info.json"), encoding="utf-8") as f:
    info = json.load(f)
  assert info["extraction"]["model"] == "cifar_resnet20"
  assert info["extraction"]["stage"] == "stage2" and info["extraction"]["pool"] == "avg"
  assert info["class_names"] == ["0", "1", "2", "3", "4"]
  assert info["splits"]["train"]["features_shape"] == [721, 32]
  assert info["preprocessing"]["mean"] == [0.5, 0.5, 0.5]


def test_command_line_bad_stage_is_a_clear_error(digits_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "tlflax.cli.features", "--config", "configs/digits.py",
       "--output", str(tmp_path / "out"), "--stage", "stage9",
       f"--config.data.data_dir={digits_dir}"],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 1
  assert ("tlflax.cli.features: error: Unknown stage 'stage9' for 'cifar_resnet20'; choose one of "
          "stem, stage1, stage2, stage3, pre_logits, logits with --stage.") in result.stderr
  assert not os.path.exists(tmp_path / "out")


def test_logistic_regression_on_extracted_features_beats_chance(cli_output):
  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  train_x, train_y = features.load(cli_output, "train")
  eval_x, eval_y = features.load(cli_output, "eval")
  classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
  classifier.fit(train_x, train_y)
  # Five classes: chance is 20%. Even a random network's stage-2 features
  # separate these digits well (about 90%).
  assert classifier.score(eval_x, eval_y) > 0.6


def test_skipped_files_are_left_out_named_and_labels_stay_aligned(tmp_path, caplog):
  """data.skip_bad_files=True: a truncated JPEG's row is left out of the
  features and the labels alike, and info.json and a warning name it."""
  from test_data import write_jpeg_folder  # pylint: disable=import-outside-toplevel

  def config(root, skip):
    c = digits_config(None)
    c.unlock()
    c.data.update(source="folder", path=str(root), train_split="train", eval_split="val",
                  data_dir="", skip_bad_files=skip, num_workers=0)
    c.eval_batch_size = 4  # 6 images: a full batch, then a padded one
    return c

  clean = write_jpeg_folder(tmp_path / "clean")
  cut = write_jpeg_folder(tmp_path / "cut", cut=["val/dog/1.jpg"])  # the same images, one cut
  features.extract_to_directory(config(clean, False), str(tmp_path / "all"), "stage1",
                                splits=["eval"], progress=False)
  with caplog.at_level("WARNING", logger="tlflax.inference.features"):
    info = features.extract_to_directory(config(cut, True), str(tmp_path / "out"), "stage1",
                                         splits=["eval"], progress=False)
  bad = str(cut / "val" / "dog" / "1.jpg")
  position = 4  # cat/0..2, dog/0..2
  assert info["splits"]["eval"]["skipped_files"] == [{"example": position, "name": bad}]
  assert info["splits"]["eval"]["num_examples"] == 5
  assert features.read_info(tmp_path / "out")["splits"]["eval"]["skipped_files"][0]["name"] == bad
  warnings = [r.getMessage() for r in caplog.records if "fail to decode" in r.getMessage()]
  assert len(warnings) == 1 and "left out 1 of 6 examples" in warnings[0] and bad in warnings[0]

  all_x, all_y = features.load(tmp_path / "all", "eval")
  got_x, got_y = features.load(tmp_path / "out", "eval")
  assert got_x.shape == (5, 16) and got_y.shape == (5,)
  keep = [i for i in range(6) if i != position]
  np.testing.assert_array_equal(got_y, all_y[keep])
  assert got_y.tolist() == [0, 0, 0, 1, 1]
  # The same rows in batches whose other rows differ (the bad one is zeros):
  # BatchNorm uses running statistics, so rows are independent up to the order
  # XLA sums in, a few float32 units in the last place.
  np.testing.assert_allclose(got_x, all_x[keep], rtol=1e-5, atol=1e-6)
