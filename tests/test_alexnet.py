"""AlexNet (models/alexnet.py, weights/alexnet.py) computes what torchvision computes.

Random torchvision weights, read back by our converter, compared on 127x127
images: the last map is then 3x3, so the adaptive 6x6 pool repeats distinct
cells and the NCHW -> NHWC row permutation of the first dense layer is
exercised with distinct values in both directions (63 px, torchvision's
`min_size`, would leave a single pixel).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from conftest import (FLOAT64_TOLERANCE, INFERENCE_TOLERANCE, float32_train_bound,
                      relative_error, report_parity)
from test_torchvision_parity import no_dropout, run_in_float64, to_nhwc
from tlflax import freeze, models, weights
from tlflax.weights import registry
from tlflax.weights.merge import WeightsError, model_shapes

SIZE = 127


@pytest.fixture(name="alexnet_file", scope="module")
def fixture_alexnet_file(tmp_path_factory):
  """torchvision's alexnet with random weights (its own init), as torchvision saves it."""
  torch.manual_seed(0)
  reference = torchvision.models.alexnet()
  path = tmp_path_factory.mktemp("alexnet") / "alexnet_random.pth"
  torch.save(reference.state_dict(), path)
  return reference, str(path)


@pytest.fixture(name="variables", scope="module")
def fixture_variables(alexnet_file):
  return weights.load("alexnet", alexnet_file[1], source="torchvision")


def test_torchvision_parity(alexnet_file, variables):
  """Inference, and training mode with dropout off on both sides (it is random)."""
  reference = alexnet_file[0]
  no_dropout(reference)
  model = models.get_model("alexnet", dropout_rate=0.0)
  images = np.random.RandomState(1).randn(4, 3, SIZE, SIZE).astype(np.float32)
  errors = {}
  with torch.no_grad():
    for mode in ("inference", "train"):
      train = mode == "train"
      reference.train(train)
      expected32 = reference(torch.from_numpy(images)).numpy()
      exact = reference.double()(torch.from_numpy(images).double()).numpy()
      reference.float()
      actual, _ = model.apply(variables, to_nhwc(images), train=train, mutable=["batch_stats"])
      errors[f"{mode}32"] = relative_error(actual, exact if train else expected32)
      errors[f"{mode}64"] = relative_error(run_in_float64(model, variables, images, train),
                                           exact)
      if train:
        errors["train32_bound"] = float32_train_bound(relative_error(expected32, exact))
  report_parity("alexnet", "torchvision", **errors)
  assert errors["inference32"] < INFERENCE_TOLERANCE
  assert errors["inference64"] < FLOAT64_TOLERANCE
  assert errors["train32"] < errors["train32_bound"]
  assert errors["train64"] < FLOAT64_TOLERANCE
  # The default model keeps torchvision's dropout and needs the rng in training.
  default = models.get_model("alexnet")
  first, second = (default.apply(variables, to_nhwc(images), train=True,
                                 rngs={"dropout": jax.random.key(k)}) for k in (1, 2))
  assert not np.allclose(first, second)


def test_parameter_count_equals_torchvisions():
  with torch.device("meta"):
    expected = sum(p.numel() for p in torchvision.models.alexnet().parameters())
  ours = sum(int(np.prod(s)) for s in model_shapes(models.get_model("alexnet")).values())
  assert ours == expected == 61_100_840


def test_stages_features_headless_and_bfloat16(variables):
  # The parity test's images: the operations compiled for their shape are reused.
  images = to_nhwc(np.random.RandomState(1).randn(4, 3, SIZE, SIZE).astype(np.float32))
  model = models.get_model("alexnet")
  assert model.stage_names == ("stage1", "stage2", "stage3", "fc")
  features = models.extract_features(model, variables, images)
  assert {name: features[name].shape for name in model.stage_names} == {
      "stage1": (4, 15, 15, 64), "stage2": (4, 7, 7, 192), "stage3": (4, 3, 3, 256),
      "fc": (4, 4096)}
  headless = {"params": {k: v for k, v in variables["params"].items() if k != "head"}}
  np.testing.assert_array_equal(
      models.get_model("alexnet", num_classes=None).apply(headless, images), features["fc"])
  resumed = models.get_model("alexnet", input_stage="stage2").apply(variables, features["stage2"])
  np.testing.assert_allclose(resumed, features["logits"], rtol=1e-5, atol=1e-6)
  truncated = models.get_model("alexnet", last_stage="stage3", num_classes=None)
  np.testing.assert_allclose(truncated.apply(headless, images),
                             features["stage3"].mean(axis=(1, 2)), rtol=1e-6)
  # bfloat16 keeps 8 significant bits; eight layers of rounding stay near a percent.
  logits = models.get_model("alexnet", dtype="bfloat16").apply(variables, images)
  assert logits.dtype == jnp.float32
  assert relative_error(logits, features["logits"]) < 5e-2


@pytest.mark.parametrize("spec, frozen", [
    ("depth:2", ("stage1/", "stage2/")),
    ("depth:4", ("stage1/", "stage2/", "stage3/", "fc/")),
    ("surgical:fc", ("stage1/", "stage2/", "stage3/")),
])
def test_freeze_rules_decide_every_parameter(spec, frozen):
  model = models.get_model("alexnet", num_classes=5)
  params = {k: v for k, v in jax.eval_shape(model.init, jax.random.key(0),
                                            jnp.zeros((1, 64, 64, 3)))["params"].items()}
  freezing = freeze.compile_rules(freeze.rules_from_spec(spec, model.stage_names), params,
                                  stage_names=model.stage_names)
  every_path = freezing.trainable_paths + freezing.frozen_paths
  assert sorted(freezing.frozen_paths) == sorted(p for p in every_path if p.startswith(frozen))


def test_small_inputs_and_wrong_sources_say_what_to_do(alexnet_file, variables):
  with pytest.raises(ValueError, match="AlexNet needs inputs of at least 63 px"):
    jax.eval_shape(models.get_model("alexnet").apply, variables, jnp.zeros((1, 48, 48, 3)))
  for source in ("timm", "keras"):
    with pytest.raises(WeightsError, match=rf"come from torchvision only, not {source}"):
      weights.load("alexnet", alexnet_file[1], source=source)
  with pytest.raises(WeightsError, match="tensors have no place in a AlexNet"):
    weights.load("alexnet", model_file_of_another_kind(alexnet_file[1]), source="torchvision")


def model_file_of_another_kind(path):
  """A resnet-shaped state dict beside `path`."""
  other = path.replace(".pth", "_resnet18.pth")
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
  return other


def test_registry_entry():
  entry = registry.get("alexnet.tv_in1k")
  assert entry.url == "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
  assert str(entry.hash) == "sha256 starting with 7be5be79"
  assert entry.reported_top1 == 56.522 and entry.class_names == "imagenet1k"
  assert (entry.preprocessing.resize_size, entry.preprocessing.crop_size,
          entry.preprocessing.interpolation) == (256, 224, "bilinear")


@pytest.mark.slow  # three commands with their own start-up and compilation
def test_command_lines_convert_classify_and_features(alexnet_file, tmp_path, capsys):
  """convert -> a tlflax checkpoint, which classify and features then use, all in-process."""
  # pylint: disable=import-outside-toplevel
  from PIL import Image
  from tlflax.cli import classify as classify_cli
  from tlflax.cli import convert as convert_cli
  from tlflax.cli import features as features_cli
  from tlflax.data import digits
  from tlflax.inference import features

  checkpoint = str(tmp_path / "alexnet")
  assert convert_cli.main(["--source", "torchvision", "--model", "alexnet", "--input",
                           alexnet_file[1], "--output", checkpoint]) == 0
  assert "61,100,840 parameters" in capsys.readouterr().out

  image = tmp_path / "image.png"
  Image.fromarray(np.random.RandomState(0).randint(0, 256, (90, 120, 3), np.uint8)).save(image)
  assert classify_cli.main(["--weights", checkpoint, "--top_k", "3", str(image)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[-4] == str(image) and all("%" in line for line in lines[-3:])

  data_dir = str(tmp_path / "tfds")
  digits.prepare("source", data_dir)
  output = str(tmp_path / "features")
  assert features_cli.main([
      "--config", "configs/digits.py", "--output", output, "--stage", "stage3", "--splits",
      "eval", f"--config.data.data_dir={data_dir}", "--config.model.name=alexnet",
      "--config.data.image_size=64", f"--config.init.weights={checkpoint}",
      "--config.init.source=tlflax", "--config.eval_batch_size=96"]) == 0
  assert "Wrote stage3 features of alexnet" in capsys.readouterr().out
  eval_features, eval_labels = features.load(output, "eval")
  assert eval_features.shape == (180, 256) and eval_labels.shape == (180,)
  assert np.isfinite(eval_features).all() and eval_features.std() > 0


@pytest.mark.slow  # four short runs, each compiling its own step
def test_freeze_depth_sweep_trains_only_what_each_depth_leaves(alexnet_file, tmp_path):
  """A freeze-depth sweep over torchvision's AlexNet: the frozen prefix comes
  from the prefix cache, and each run moves the stages after its depth only."""
  # pylint: disable=import-outside-toplevel
  import json
  import os
  from tlflax import build, defaults, sweeps
  from tlflax.training import checkpoint
  from tlflax.tree import flatten

  config = defaults.base_config()
  config.model.name = "alexnet"
  config.data.source, config.data.name = "digits", "target"
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.train_examples_per_class = 5
  config.data.image_size = config.data.resize_size = 64
  config.data.augment = "none"  # deterministic inputs: the prefix cache applies
  config.init.weights, config.init.source = alexnet_file[1], "torchvision"
  config.batch_size, config.eval_batch_size = 16, 96
  config.num_train_steps = 1
  config.prefix_cache.enabled = True
  config.prefix_cache.directory = str(tmp_path / "cache")
  depths = (1, 2, 3, 4)
  points = sweeps.make_points([{"freeze.rules": f"depth:{k}"} for k in depths], config)
  rows = sweeps.run_sweep(config, points, str(tmp_path / "sweep"))

  assert [r.point for r in rows] == [f"freeze_rules-depth_{k}" for k in depths]
  assert all(0 <= r.accuracy <= 1 and r.steps == 1 and r.start == "pretrained" for r in rows)
  cached = {json.load(open(tmp_path / "cache" / entry / "info.json", encoding="utf-8"))["stage"]
            for entry in os.listdir(tmp_path / "cache")}
  # `fc` runs dropout in training, so no frozen prefix is cached past stage3.
  assert cached == {"stage1", "stage2", "stage3"}
  initial = flatten(build.build(config, num_classes=5).variables["params"])
  later = ("stage1", "stage2", "stage3", "fc", "head")
  for depth, row in zip(depths, rows):
    trained = flatten(checkpoint.restore_params_only(str(tmp_path / "sweep" / row.point))["params"])
    moved = {path.split("/")[0] for path, value in trained.items()
             if not np.array_equal(value, initial[path])}
    assert moved == set(later[depth:]), depth
  assert os.path.exists(tmp_path / "sweep" / "results.md")
