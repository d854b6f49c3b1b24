"""ConvNeXt (models/convnext.py, weights/convnext.py) computes what torchvision and timm compute.

Random weights saved by the reference libraries themselves, read back by our
converters, compared on 32x32 images: the smallest size torchvision allows
(`min_size` 32), where the stem gives 8x8 and stage 4 a 1x1 map. ConvNeXt
has no BatchNorm, so "training mode" differs from inference only by
stochastic depth, switched off on both sides for the comparison (it is
random) and tested on its own below.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from conftest import (FLOAT64_TOLERANCE, INFERENCE_TOLERANCE, by_run_set,
                      float32_train_bound, relative_error, report_parity)
from test_torchvision_parity import run_in_float64, to_nhwc
from tlflax import freeze, models, weights
from tlflax.models import convnext
from tlflax.weights import registry
from tlflax.weights.merge import WeightsError, model_shapes

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # pylint: disable=wrong-import-position

SIZE = 32
NAMES = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")
# The larger sizes take 10-90 s each (their 27-block stage 3, and up to 200M
# parameters saved, read and run twice) and repeat the blocks of the tiny one:
# their parity runs in `pytest -m every_size`, their parameter counts (shapes
# only) in the slow set.
SLOW = pytest.mark.slow


def randomize_convnext(module: torch.nn.Module, seed: int = 0) -> None:
  """LayerNorm affine parameters and layer scales away from their 1 / 0 / 1e-6 init.

  With the published 1e-6 layer scale every block would add almost nothing,
  and a mistake inside the blocks would not show in the output.
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for layer in module.modules():
      if isinstance(layer, torch.nn.LayerNorm):
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) + 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.2)
    for name, parameter in module.named_parameters():
      if name.endswith(("layer_scale", "gamma")):
        parameter.copy_(torch.rand(parameter.shape, generator=generator) * 0.5 + 0.25)


def torchvision_reference(name, **options):
  torch.manual_seed(0)
  reference = getattr(torchvision.models, name)(stochastic_depth_prob=0.0, **options)
  randomize_convnext(reference)
  return reference


def timm_reference(name, **options):
  torch.manual_seed(0)
  reference = timm.create_model(name, pretrained=False, drop_path_rate=0.0, **options)
  randomize_convnext(reference)
  return reference


def parity_errors(reference, model, variables):
  """Relative errors of ours vs the reference: inference and training mode, float32 and float64.

  One batch of four serves all four runs: every new shape or dtype costs the
  first eager call a compilation of each operation.
  """
  images = np.random.RandomState(1).randn(4, 3, SIZE, SIZE).astype(np.float32)
  errors = {}
  with torch.no_grad():
    for mode in ("inference", "train"):
      train = mode == "train"
      reference.train(train)
      expected32 = reference(torch.from_numpy(images)).numpy()
      exact = reference.double()(torch.from_numpy(images).double()).numpy()
      reference.float()
      actual, _ = model.apply(variables, to_nhwc(images), train=train, mutable=["batch_stats"],
                              rngs={"dropout": jax.random.key(0)})
      errors[f"{mode}32"] = relative_error(actual, exact if train else expected32)
      errors[f"{mode}64"] = relative_error(run_in_float64(model, variables, images, train),
                                           exact)
      if train:
        errors["train32_bound"] = float32_train_bound(relative_error(expected32, exact))
  return errors


def assert_parity(errors, name, library):
  report_parity(name, library, **errors)
  assert errors["inference32"] < INFERENCE_TOLERANCE
  assert errors["inference64"] < FLOAT64_TOLERANCE
  assert errors["train32"] < errors["train32_bound"]
  assert errors["train64"] < FLOAT64_TOLERANCE


@pytest.fixture(name="tiny_file", scope="module")
def fixture_tiny_file(tmp_path_factory):
  """torchvision's convnext_tiny with random weights, saved as torchvision saves it."""
  reference = torchvision_reference("convnext_tiny")
  path = tmp_path_factory.mktemp("convnext") / "convnext_tiny_random.pth"
  torch.save(reference.state_dict(), path)
  return reference, str(path)


@pytest.fixture(name="tiny_variables", scope="module")
def fixture_tiny_variables(tiny_file):
  return weights.load("convnext_tiny", tiny_file[1], source="torchvision")


def test_torchvision_tiny_parity(tiny_file, tiny_variables):
  assert_parity(parity_errors(tiny_file[0], models.get_model("convnext_tiny"), tiny_variables),
                "convnext_tiny", "torchvision")


@pytest.mark.parametrize("name", by_run_set(NAMES[1:]))
def test_torchvision_parity(name, tmp_path):
  reference = torchvision_reference(name)
  path = tmp_path / f"{name}.pth"
  torch.save(reference.state_dict(), path)
  variables = weights.load(name, path, source="torchvision")
  assert_parity(parity_errors(reference, models.get_model(name), variables), name, "torchvision")


# The torchvision parity of convnext_tiny runs by default; timm differs only in names.
@pytest.mark.parametrize("name", by_run_set(NAMES, slow=NAMES[:1]))
def test_timm_safetensors_parity(name, tmp_path):
  reference = timm_reference(name, num_classes=12)
  path = tmp_path / "model.safetensors"
  save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
  variables = weights.load(name, path, source="timm")
  assert_parity(parity_errors(reference, models.get_model(name, num_classes=12), variables),
                name, "timm")


@pytest.mark.parametrize("name", by_run_set(NAMES, default=NAMES[:1], slow=NAMES[1:]))
def test_parameter_counts_equal_the_originals(name):
  with torch.device("meta"):  # shapes only: nothing is allocated or initialised
    counts = {sum(p.numel() for p in getattr(torchvision.models, name)().parameters()),
              sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())}
  ours = sum(int(np.prod(s)) for s in model_shapes(models.get_model(name)).values())
  assert counts == {ours}


def small_convnext(**options):
  """Two blocks a stage, 8-32 channels: quick to run where the size does not matter."""
  return convnext.ConvNeXt(depths=(2, 2, 2, 2), widths=(8, 16, 24, 32), **options)


def numpy_variables(model, seed=0):
  """Random variables from the traced shapes (running `model.init` takes many seconds).

  Layer scales are 1, so that every block adds to its input as much as it keeps.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":  # fan-in scaling keeps activations O(1)
      return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
    if name in ("scale", "layer_scale"):
      return np.ones(leaf.shape, np.float32)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_drop_path_follows_the_publishers_schedule_and_only_trains():
  with torch.device("meta"):
    torchvision_rates = [block.stochastic_depth.p for block in torchvision.models.convnext_tiny(
        stochastic_depth_prob=0.3).modules() if isinstance(block, torchvision.models.convnext.CNBlock)]
    timm_rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in timm.create_model(
        "convnext_tiny", drop_path_rate=0.3).modules() if type(block).__name__ == "ConvNeXtBlock"]
  ours = [r for stage in models.get_model("convnext_tiny", drop_path_rate=0.3)
          .block_drop_path_rates() for r in stage]
  np.testing.assert_allclose(ours, torchvision_rates, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ours, timm_rates, rtol=1e-6, atol=1e-7)

  images = jnp.asarray(np.random.RandomState(0).randn(8, SIZE, SIZE, 3), jnp.float32)
  model = small_convnext(drop_path_rate=0.5, num_classes=3)
  variables = numpy_variables(small_convnext(num_classes=3))
  plain = small_convnext(num_classes=3).apply(variables, images)
  # Inference ignores the rate; training draws from the "dropout" rng.
  np.testing.assert_array_equal(model.apply(variables, images), plain)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, images, train=True)
  first, second = (model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(k)})
                   for k in (1, 2))
  assert not np.allclose(first, second) and not np.allclose(first, plain)
  with pytest.raises(ValueError, match=r"drop_path_rate=1.0: use a probability in \[0, 1\)"):
    small_convnext(drop_path_rate=1.0).init(jax.random.key(0), images)


def test_drop_path_drops_whole_examples_and_rescales_the_rest():
  out = np.asarray(convnext.drop_path(jnp.ones((1000, 2, 2, 3)), 0.25, jax.random.key(0)))
  per_example = out.reshape(1000, -1)
  assert set(np.unique(per_example)) == {0.0, np.float32(1 / 0.75)}
  assert (per_example == per_example[:, :1]).all()  # all of an example, or none
  assert 0.2 < (per_example[:, 0] == 0).mean() < 0.3


def test_headless_bfloat16_and_truncated_models(tiny_variables):
  # The parity test's images: the operations compiled for their shape are reused.
  images = to_nhwc(np.random.RandomState(1).randn(4, 3, SIZE, SIZE).astype(np.float32))
  model = models.get_model("convnext_tiny")
  features = models.extract_features(model, tiny_variables, images)
  assert list(features) == ["stem", "stage1", "stage2", "stage3", "stage4", "final_norm",
                            "pre_logits", "logits"]
  assert [features[s].shape for s in model.stage_names] == [
      (4, 8, 8, 96), (4, 8, 8, 96), (4, 4, 4, 192), (4, 2, 2, 384), (4, 1, 1, 768), (4, 768)]

  headless = models.get_model("convnext_tiny", num_classes=None)
  pooled = headless.apply({"params": {k: v for k, v in tiny_variables["params"].items()
                                      if k != "head"}}, images)
  np.testing.assert_array_equal(pooled, features["final_norm"])

  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per operation);
  # over 18 residual blocks that compounds to about a percent.
  bfloat16 = models.get_model("convnext_tiny", dtype="bfloat16")
  logits = bfloat16.apply(tiny_variables, images)
  assert logits.dtype == jnp.float32
  assert relative_error(logits, features["logits"]) < 5e-2

  # Resuming after stage 2 (the prefix cache) gives the full model's logits;
  # stopping after stage 4 pools it without the final norm.
  resumed = models.get_model("convnext_tiny", input_stage="stage2").apply(
      tiny_variables, features["stage2"])
  np.testing.assert_allclose(resumed, features["logits"], rtol=1e-5, atol=1e-5)
  truncated = models.get_model("convnext_tiny", last_stage="stage4", num_classes=None)
  np.testing.assert_allclose(truncated.apply(tiny_variables, images),
                             features["stage4"].mean(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("spec, frozen_prefixes", [
    ("depth:2", ("stem/", "stage1/", "stage2/")),
    ("depth:5", ("stem/", "stage1/", "stage2/", "stage3/", "stage4/", "final_norm/")),
    ("surgical:stage3", ("stem/", "stage1/", "stage2/", "stage4/", "final_norm/")),
    ("linear_probe", ("stem/", "stage1/", "stage2/", "stage3/", "stage4/", "final_norm/")),
])
def test_freeze_rules_decide_every_parameter(spec, frozen_prefixes):
  model = models.get_model("convnext_tiny", num_classes=5)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  freezing = freeze.compile_rules(freeze.rules_from_spec(spec, model.stage_names), params,
                                  stage_names=model.stage_names)
  every_path = freezing.trainable_paths + freezing.frozen_paths
  assert sorted(freezing.frozen_paths) == sorted(
      p for p in every_path if p.startswith(frozen_prefixes))


def test_layerwise_decay_gives_the_final_norm_its_own_rate():
  model = models.get_model("convnext_tiny", num_classes=5)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  freezing = freeze.compile_rules(freeze.rules_from_spec("lld:0.5", model.stage_names), params)
  rates = freezing.path_multiplier
  assert rates["head/kernel"] == 1.0 and rates["final_norm/scale"] == 0.5
  assert rates["stage4/block3/layer_scale"] == 0.25 and rates["stem/conv/kernel"] == 0.5 ** 6


def test_wrong_files_sources_and_sizes_say_what_to_do(tiny_file, tiny_variables):
  with pytest.raises(ValueError, match="ConvNeXt needs inputs of at least 32 px"):
    # Traced only (eval_shape): the check needs shapes, not a computation.
    jax.eval_shape(models.get_model("convnext_tiny").apply, tiny_variables,
                   jnp.zeros((1, 24, 24, 3)))
  with pytest.raises(WeightsError, match=r"come from torchvision or timm, not keras"):
    weights.load("convnext_tiny", tiny_file[1], source="keras")
  with pytest.raises(WeightsError, match=r"tensors have no place in a ConvNeXt: features\.0\.0"):
    weights.load("convnext_tiny", tiny_file[1], source="timm")
  with pytest.raises(WeightsError, match=r"(?s)do not fit model 'convnext_small'.*162 missing from "
                                         r"the file"):
    weights.load("convnext_small", tiny_file[1], source="torchvision")


def test_registry_entries():
  assert registry.list_ids("convnext_tiny") == ["convnext_tiny.fb_in1k", "convnext_tiny.tv_in1k"]
  entry = registry.get("convnext_base.tv_in1k")
  assert entry.url == "https://download.pytorch.org/models/convnext_base-6075fbad.pth"
  assert str(entry.hash) == "sha256 starting with 6075fbad" and entry.reported_top1 == 84.062
  assert (entry.preprocessing.resize_size, entry.preprocessing.crop_size) == (232, 224)
  assert registry.default_preprocessing("convnext_tiny").resize_size == 236
  entry = registry.get("convnext_large.fb_in1k")
  assert entry.source == "timm" and entry.hash is None and "no hash" in entry.hash_note
  assert entry.url == ("https://huggingface.co/timm/convnext_large.fb_in1k/resolve/main/"
                       "model.safetensors")
  assert (entry.preprocessing.resize_size, entry.preprocessing.interpolation) == (256, "bicubic")
  assert all(registry.get(i).class_names == "imagenet1k" for i in registry.list_ids()
             if i.startswith("convnext"))


@SLOW  # three commands, each compiling ConvNeXt-T for its own input shape
def test_command_lines_convert_classify_and_features(tiny_file, tmp_path, capsys):
  """convert -> a tlflax checkpoint, which classify and features then use, all in-process."""
  # pylint: disable=import-outside-toplevel
  from PIL import Image
  from tlflax.cli import classify as classify_cli
  from tlflax.cli import convert as convert_cli
  from tlflax.cli import features as features_cli
  from tlflax.data import digits
  from tlflax.inference import features

  checkpoint = str(tmp_path / "convnext_tiny")
  assert convert_cli.main(["--source", "torchvision", "--model", "convnext_tiny", "--input",
                           tiny_file[1], "--output", checkpoint]) == 0
  assert "28,589,128 parameters" in capsys.readouterr().out

  image = tmp_path / "image.png"
  Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 50, 3), np.uint8)).save(image)
  assert classify_cli.main(["--weights", checkpoint, "--image_size", "32", "--top_k", "3",
                            str(image)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[-4] == str(image) and all("%" in line for line in lines[-3:])

  data_dir = str(tmp_path / "tfds")
  digits.prepare("source", data_dir)
  output = str(tmp_path / "features")
  assert features_cli.main([
      "--config", "configs/digits.py", "--output", output, "--stage", "stage2", "--splits",
      "eval", f"--config.data.data_dir={data_dir}", "--config.model.name=convnext_tiny",
      f"--config.init.weights={checkpoint}", "--config.init.source=tlflax",
      "--config.eval_batch_size=96"]) == 0
  assert "Wrote stage2 features of convnext_tiny" in capsys.readouterr().out
  eval_features, eval_labels = features.load(output, "eval")
  assert eval_features.shape == (180, 192) and eval_labels.shape == (180,)
  assert np.isfinite(eval_features).all() and eval_features.std() > 0


@SLOW  # a ConvNeXt-T training step compiles for a minute on two CPU cores
def test_freeze_depth_two_run_keeps_the_frozen_stages_bit_identical(tiny_file, tmp_path):
  from test_train import final_params, load_config  # pylint: disable=import-outside-toplevel
  from tlflax import training  # pylint: disable=import-outside-toplevel
  from tlflax.data import digits  # pylint: disable=import-outside-toplevel
  from tlflax.tree import flatten  # pylint: disable=import-outside-toplevel

  data_dir = str(tmp_path / "tfds")
  digits.prepare("source", data_dir)
  config = load_config(
      "digits.py", "--config.batch_size=16", "--config.eval_batch_size=96",
      "--config.log_every_steps=1", "--config.model.name=convnext_tiny",
      "--config.num_train_steps=2", f"--config.data.data_dir={data_dir}",
      f"--config.init.weights={tiny_file[1]}", "--config.init.source=torchvision",
      "--config.freeze.rules=depth:2")
  result = training.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 2 and np.isfinite(result["eval/loss"])

  before = flatten(weights.load("convnext_tiny", tiny_file[1], source="torchvision")["params"])
  after = flatten(final_params(str(tmp_path / "run"))["params"])
  frozen = [k for k in after if k.startswith(("stem/", "stage1/", "stage2/"))]
  trained = [k for k in after if k.startswith(("stage3/", "stage4/", "final_norm/"))]
  # stem 4 tensors; a block 9; a downsampling 4; final_norm 2.
  assert len(frozen) == 4 + 9 * 3 + 4 + 9 * 3 and len(trained) == 4 + 9 * 9 + 4 + 9 * 3 + 2
  for key in frozen:
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  assert all(not np.array_equal(after[k], before[k]) for k in trained)
