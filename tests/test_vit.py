"""Vision Transformers: parity with torchvision and timm, resampled position embeddings,
stages (truncation, prefix input, pooling, freezing), registry entries and the command lines.

Parity runs at small images (32 px: a 2x2 patch grid for patch 16, 1x1 for
patch 32) with the real layer shapes; a ViT's layers do not depend on the
image size except through the number of tokens.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
import timm
from timm.layers import resample_abs_pos_embed

from conftest import (FLOAT64_TOLERANCE, INFERENCE_TOLERANCE, by_run_set,
                      float32_train_bound, relative_error, report_parity)
from test_torchvision_parity import no_dropout, run_in_float64, to_nhwc
from tlflax import build, defaults, freeze, models, weights
from tlflax.data.images import Preprocessing
from tlflax.models import registry as model_registry
from tlflax.models import vit
from tlflax.tree import flatten
from tlflax.weights import registry
from tlflax.weights import vit as vit_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TORCHVISION_NAMES = ("vit_b_16", "vit_b_32", "vit_l_16")
TIMM_NAMES = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
              "vit_large_patch16_224")
# What each reference publishes: layer sizes, LayerNorm epsilon.
SHAPES = {
    "vit_b_16": (16, 768, 12, 12, 3072), "vit_b_32": (32, 768, 12, 12, 3072),
    "vit_l_16": (16, 1024, 24, 16, 4096),
    "vit_tiny_patch16_224": (16, 192, 12, 3, 768),
    "vit_small_patch16_224": (16, 384, 12, 6, 1536),
    "vit_base_patch16_224": (16, 768, 12, 12, 3072),
    "vit_large_patch16_224": (16, 1024, 24, 16, 4096),
}
SIZE = 32
# The default run's ViT: torchvision's and timm's own classes at a small width
# (8 blocks, 2 per stage; patch 8 -> a 4x4 grid at 32 px), registered as
# "vit_test" for these tests. The published sizes are tested in the slow and
# every_size sets.
SMALL = dict(patch_size=8, hidden_size=32, depth=8, num_heads=2, mlp_dim=64)


@pytest.fixture(autouse=True, scope="module")
def small_model_registered():
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(model_registry._MODELS, "vit_test",  # pylint: disable=protected-access
                  functools.partial(vit.VisionTransformer, **SMALL))
    yield


def small_timm_reference(size=SIZE, **options):
  torch.manual_seed(0)
  reference = timm.models.vision_transformer.VisionTransformer(
      img_size=size, patch_size=8, embed_dim=32, depth=8, num_heads=2, mlp_ratio=2.0,
      num_classes=7, **options)
  randomize(reference)
  return reference.eval()


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
  """Non-trivial LayerNorms, class token, position embeddings and head (zeros or ones
  after torchvision's and timm's initialisation), so that each is tested."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, parameter in module.named_parameters():
      if parameter.ndim == 1 and ("norm" in name or ".ln" in name):
        scale = 1.0 if name.endswith("weight") else 0.0
        parameter.copy_(scale + 0.2 * torch.randn(parameter.shape, generator=generator))
      elif "token" in name or "pos_emb" in name or "head" in name:
        parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def torchvision_reference(name: str, size: int = SIZE):
  torch.manual_seed(0)
  reference = getattr(torchvision.models, name)(image_size=size)
  randomize(reference)
  return reference.eval()


def timm_reference(name: str, size: int = SIZE, **options):
  torch.manual_seed(0)
  reference = timm.create_model(name, pretrained=False, img_size=size, **options)
  randomize(reference)
  return reference.eval()


def save(reference, path):
  """A state dict as torch.save's .pth, or as .safetensors (timm's format)."""
  if str(path).endswith(".safetensors"):
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
  else:
    torch.save(reference.state_dict(), path)


def assert_parity(reference, model_name, path, source, size=SIZE, **options):
  """float32 inference to INFERENCE_TOLERANCE, float64 to FLOAT64_TOLERANCE, training mode.

  Training mode (dropout off on both sides, 0 in every published model; no
  BatchNorm) is held to `float32_train_bound` of the reference's own float32
  error, and to FLOAT64_TOLERANCE in float64.
  """
  save(reference, path)
  variables = weights.load(model_name, path, source=source, **options)
  classes = flatten(variables)["params/head/kernel"].shape[-1]
  model = models.get_model(model_name, num_classes=classes, image_size=size, **options)
  images = np.random.RandomState(1).randn(2, 3, size, size).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
    exact = reference.double()(torch.from_numpy(images).double()).numpy()
  reference.float()
  error = relative_error(model.apply(variables, to_nhwc(images), train=False), expected)
  error64 = relative_error(run_in_float64(model, variables, images, train=False), exact)
  assert error < INFERENCE_TOLERANCE and error64 < FLOAT64_TOLERANCE
  no_dropout(reference)
  reference.train()
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
    exact = reference.double()(torch.from_numpy(images).double()).numpy()
  reference.float()
  train_error = relative_error(
      model.apply(variables, to_nhwc(images), train=True, rngs={"dropout": jax.random.key(0)}),
      exact)
  bound = float32_train_bound(relative_error(expected, exact))
  train_error64 = relative_error(run_in_float64(model, variables, images, train=True), exact)
  assert train_error < bound and train_error64 < FLOAT64_TOLERANCE
  report_parity(model_name, source, inference32=error, inference64=error64, train32=train_error,
                train32_bound=bound, train64=train_error64)


def check_layer_shapes(model_name, reference, source):
  patch, hidden, depth, heads, mlp = SHAPES[model_name]
  model = models.get_model(model_name)
  assert (model.patch_size, model.hidden_size, model.depth, model.num_heads,
          model.mlp_dim) == SHAPES[model_name]
  if source == "torchvision":
    assert (reference.patch_size, reference.hidden_dim, len(reference.encoder.layers),
            reference.mlp_dim) == (patch, hidden, depth, mlp)
    layer = reference.encoder.layers[0]
    assert layer.self_attention.num_heads == heads
    norms = [layer.ln_1, layer.ln_2, reference.encoder.ln]
  else:
    assert (reference.patch_embed.patch_size[0], reference.embed_dim, len(reference.blocks),
            reference.blocks[0].attn.num_heads) == (patch, hidden, depth, heads)
    assert reference.blocks[0].mlp.fc1.out_features == mlp
    norms = [reference.blocks[0].norm1, reference.blocks[0].norm2, reference.norm]
  assert {n.eps for n in norms} == {model.layer_norm_epsilon} == {1e-6}


# ----------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------

def test_timm_vision_transformer_parity(tmp_path):
  assert_parity(small_timm_reference(), "vit_test", tmp_path / "vit.safetensors", "timm")


def test_torchvision_vision_transformer_parity(tmp_path):
  torch.manual_seed(0)
  reference = torchvision.models.VisionTransformer(
      image_size=SIZE, patch_size=8, num_layers=8, num_heads=2, hidden_dim=32, mlp_dim=64,
      num_classes=7)
  randomize(reference)
  assert_parity(reference.eval(), "vit_test", tmp_path / "vit.pth", "torchvision")


# The published sizes: the smallest of each library in the slow set, the
# others (the same blocks, wider or deeper) in `pytest -m every_size`.
@pytest.mark.parametrize("name", by_run_set(TORCHVISION_NAMES, slow=("vit_b_32",)))
def test_torchvision_parity(name, tmp_path):
  reference = torchvision_reference(name)
  check_layer_shapes(name, reference, "torchvision")
  assert_parity(reference, name, tmp_path / f"{name}.pth", "torchvision")


@pytest.mark.parametrize("name", by_run_set(TIMM_NAMES, slow=("vit_tiny_patch16_224",)))
def test_timm_parity(name, tmp_path):
  reference = timm_reference(name)
  check_layer_shapes(name, reference, "timm")
  assert_parity(reference, name, tmp_path / f"{name}.safetensors", "timm")


def parameter_count(name, size):
  shapes = jax.eval_shape(models.get_model(name, image_size=size).init, jax.random.key(0),
                          jnp.zeros((1, SIZE, SIZE, 3)))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


LARGE = pytest.mark.slow


@pytest.mark.parametrize("name", [*TIMM_NAMES[:3], pytest.param(TIMM_NAMES[3], marks=LARGE)])
def test_parameter_counts_equal_timms(name):
  with torch.device("meta"):
    reference = timm.create_model(name, pretrained=False)
  assert parameter_count(name, 224) == sum(p.numel() for p in reference.parameters())


# torchvision's weight enums publish their counts, SWAG's at its own image size.
@pytest.mark.parametrize("name, size, count", [
    ("vit_b_16", 224, 86567656), ("vit_b_16", 384, 86859496), ("vit_b_32", 224, 88224232),
    pytest.param("vit_l_16", 224, 304326632, marks=LARGE),
    pytest.param("vit_l_16", 512, 305174504, marks=LARGE)])
def test_parameter_counts_equal_torchvisions(name, size, count):
  assert parameter_count(name, size) == count
  with torch.device("meta"):
    reference = getattr(torchvision.models, name)(image_size=size)
  assert sum(p.numel() for p in reference.parameters()) == count


# ----------------------------------------------------------------------------
# Position embeddings at another image size
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("grid", [24, 7, 3, 14])
def test_resampling_equals_timms(interpolation, grid):
  embedding = np.random.RandomState(0).randn(1, 1 + 14 * 14, 16).astype(np.float32)
  expected = resample_abs_pos_embed(torch.from_numpy(embedding), [grid, grid],
                                    interpolation=interpolation).numpy()
  actual = vit.resample_position_embedding(embedding, (grid, grid), interpolation)
  assert actual.shape == expected.shape == (1, 1 + grid * grid, 16)
  assert relative_error(actual, expected) < INFERENCE_TOLERANCE
  np.testing.assert_array_equal(actual[:, 0], embedding[:, 0])  # the class token's is kept


@pytest.fixture(name="small_file", scope="module")
def fixture_small_file(tmp_path_factory, small_model_registered):
  """timm's VisionTransformer at the small width, trained (randomly) at 32 px."""
  del small_model_registered
  reference = small_timm_reference()
  path = str(tmp_path_factory.mktemp("timm") / "vit_test.safetensors")
  save(reference, path)
  return path, reference


def test_load_at_another_size_equals_timm_resampling(small_file):
  path, reference = small_file
  # Without image_size the model is built for the file's size (4x4 patches).
  assert flatten(weights.load("vit_test", path, "timm"))[
      "params/stem/position_embedding"].shape == (1, 17, 32)
  variables = weights.load("vit_test", path, "timm", image_size=48)
  assert flatten(variables)["params/stem/position_embedding"].shape == (1, 37, 32)
  # timm's model for 48 px with the same weights, its embeddings resampled by timm.
  state = dict(reference.state_dict())
  state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [6, 6])
  larger = small_timm_reference(size=48)
  larger.load_state_dict(state)
  images = np.random.RandomState(3).randn(2, 3, 48, 48).astype(np.float32)
  with torch.no_grad():
    expected = larger(torch.from_numpy(images)).numpy()
  model = models.get_model("vit_test", num_classes=7, image_size=48)
  assert relative_error(model.apply(variables, to_nhwc(images)), expected) < INFERENCE_TOLERANCE
  # An input of another size than the stored grid is resampled on the fly,
  # as timm's dynamic_img_size does.
  dynamic = small_timm_reference(dynamic_img_size=True)
  dynamic.load_state_dict(reference.state_dict())
  with torch.no_grad():
    expected = dynamic(torch.from_numpy(images)).numpy()
  at_32 = weights.load("vit_test", path, "timm")
  assert relative_error(model.apply(at_32, to_nhwc(images)), expected) < INFERENCE_TOLERANCE


def test_a_config_at_another_image_size_just_works(small_file):
  path, _ = small_file
  config = defaults.base_config()
  config.model.name = "vit_test"
  config.data.image_size = 48
  config.init.weights, config.init.source = path, "timm"
  built = build.build(config, num_classes=3)
  assert built.model.image_size == 48 and built.start == "pretrained"
  flat = flatten(built.variables)
  assert flat["params/stem/position_embedding"].shape == (1, 37, 32)
  assert flat["params/head/kernel"].shape == (32, 3)


def test_bad_sizes_and_sources_are_explained(small_file, monkeypatch):
  path, _ = small_file
  with pytest.raises(weights.WeightsError, match="no multiple of 'vit_test'.s patch size 8"):
    weights.load("vit_test", path, "timm", image_size=50)
  with pytest.raises(weights.WeightsError, match="takes weights from torchvision or timm"):
    weights.load("vit_test", path, "keras")
  monkeypatch.setitem(model_registry._MODELS, "vit_test4", functools.partial(  # pylint: disable=protected-access
      vit.VisionTransformer, **{**SMALL, "depth": 4}))
  with pytest.raises(weights.WeightsError, match="no place in 'vit_test4' .4 blocks.: blocks.4"):
    weights.load("vit_test4", path, "timm")
  model = models.get_model("vit_test", image_size=SIZE)
  with pytest.raises(ValueError, match="no whole number of 8x8 patches"):
    model.init(jax.random.key(0), jnp.zeros((1, 36, 36, 3)))
  with pytest.raises(ValueError, match="pooling='max'"):
    model.clone(pooling="max").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# ----------------------------------------------------------------------------
# Stages, pooling, prefix input, freezing
# ----------------------------------------------------------------------------

@pytest.fixture(name="small", scope="module")
def fixture_small():
  """The small ViT (2 blocks per stage) and its random variables."""
  model = models.get_model("vit_test", num_classes=5, image_size=SIZE)
  images = jnp.asarray(np.random.RandomState(0).randn(2, SIZE, SIZE, 3), jnp.float32)
  return model, model.init(jax.random.key(0), images), images


def test_stages_features_pooling_and_prefix_input(small):
  model, variables, images = small
  assert model.stage_names == ("stem", "stage1", "stage2", "stage3", "stage4")
  assert model.stage_names.blocks == tuple(f"stage{i}/block{j}" for i in range(1, 5)
                                           for j in (1, 2))
  assert sorted(variables["params"]["stage4"]) == ["block1", "block2", "norm"]
  assert "norm" not in variables["params"]["stage3"]
  features = models.extract_features(model, variables, images)
  assert features["stem"].shape == features["stage2"].shape == (2, 17, 32)  # class token + 16
  np.testing.assert_array_equal(features["pre_logits"], features["stage4"][:, 0])
  mean = model.clone(pooling="mean")
  pooled = models.extract_features(mean, variables, images, ["pre_logits"])["pre_logits"]
  np.testing.assert_allclose(pooled, features["stage4"][:, 1:].mean(axis=1), rtol=1e-6)
  # Truncated: the head on stage 2's class token (no final norm there).
  truncated = model.clone(last_stage="stage2", num_classes=None)
  out = truncated.apply(jax.tree.map(lambda x: x, variables), images)
  np.testing.assert_array_equal(out, features["stage2"][:, 0])
  # The prefix input: stage 2's tokens in, the same logits out.
  rest = model.clone(input_stage="stage2")
  np.testing.assert_allclose(rest.apply(variables, features["stage2"]),
                             features["logits"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="token sequence"):
    rest.apply(variables, images)


def multipliers(model, variables, spec):
  rules = freeze.rules_from_spec(spec, model.stage_names)
  return freeze.compile_rules(rules, variables["params"]).path_multiplier


def test_freezing_works_per_stage_and_per_block(small):
  model, variables, _ = small
  depth = multipliers(model, variables, "depth:4")
  assert {p for p, m in depth.items() if m > 0} == {"head/kernel", "head/bias"}
  surgical = multipliers(model, variables, "surgical:stage2/block1")
  assert {p.rsplit("/", 2)[0] for p, m in surgical.items() if m > 0} >= {"stage2/block1"}
  assert all(p.startswith(("stage2/block1/", "head/")) for p, m in surgical.items() if m > 0)
  # lld per block (BEiT, timm): last block decay^1 ... first block decay^8, stem decay^9;
  # the final LayerNorm at the head's rate.
  lld = multipliers(model, variables, "lld:0.5")
  assert lld["head/kernel"] == lld["stage4/norm/scale"] == 1.0
  assert lld["stage4/block2/mlp/fc2/kernel"] == 0.5
  assert lld["stage4/block1/norm1/scale"] == 0.25
  assert lld["stage1/block1/attention/qkv/kernel"] == 0.5 ** 8
  assert lld["stem/position_embedding"] == lld["stem/patch_embed/kernel"] == 0.5 ** 9
  with pytest.raises(ValueError, match=r"or a block: stage1/block1 \.\.\. stage4/block2"):
    freeze.rules_from_spec("surgical:stage2/block3", model.stage_names)


@pytest.mark.slow
def test_no_head_and_bfloat16(small):
  _, variables, images = small
  model = models.get_model("vit_test", num_classes=None, dtype="bfloat16", image_size=SIZE)
  variables = {"params": {k: v for k, v in variables["params"].items() if k != "head"}}
  out = model.apply(variables, images)
  assert out.shape == (2, 32) and out.dtype == jnp.float32
  full = models.get_model("vit_test", num_classes=None, image_size=SIZE).apply(variables, images)
  assert relative_error(out, full) < 0.05  # bfloat16 keeps ~3 significant digits


def test_pretrained_entries():
  ids = registry.list_ids(source=None)
  for name in (*TORCHVISION_NAMES, *TIMM_NAMES):
    assert any(i.startswith(name + ".") for i in ids), name
  entry = registry.get("vit_b_16.swag_e2e_in1k")
  assert entry.url == "https://download.pytorch.org/models/vit_b_16_swag-9ac1b537.pth"
  assert entry.hash.hex_digest == "9ac1b537" and entry.reported_top1 == 85.304
  assert (entry.preprocessing.crop_size, entry.preprocessing.resize_size,
          entry.preprocessing.interpolation) == (384, 384, "bicubic")
  timm_entry = registry.get("vit_base_patch16_224.augreg2_in21k_ft_in1k")
  assert timm_entry.source == "timm" and timm_entry.hash is None and timm_entry.hash_note
  assert timm_entry.preprocessing.mean == timm_entry.preprocessing.std == (0.5, 0.5, 0.5)
  assert timm_entry.preprocessing.resize_size == 248  # crop_pct 0.9
  versions = {"tv_in1k": "IMAGENET1K_V1", "swag_e2e_in1k": "IMAGENET1K_SWAG_E2E_V1",
              "swag_lc_in1k": "IMAGENET1K_SWAG_LINEAR_V1"}
  torchvision_entries = [e for e in vit_weights.PRETRAINED if e.source == "torchvision"]
  assert len(torchvision_entries) == 7
  for entry in torchvision_entries:
    published = torchvision.models.get_model_weights(entry.model_name)[
        versions[entry.id.split(".")[1]]]
    transforms = published.transforms()
    assert entry.url == published.url
    assert entry.reported_top1 == published.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert entry.preprocessing.crop_size == published.meta["min_size"][0]
    assert entry.preprocessing == Preprocessing(
        crop_size=transforms.crop_size[0], resize_size=transforms.resize_size[0],
        interpolation=transforms.interpolation.value, mean=transforms.mean, std=transforms.std)
  assert vit_weights.PRETRAINED and all(e.model_name in models.model_names()
                                        for e in vit_weights.PRETRAINED)


# ----------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------

def test_convert_and_classify_command_lines(tmp_path, capsys):
  """A timm vit_tiny file (trained at 32 px) converted, then classifying an image."""
  # pylint: disable=import-outside-toplevel
  from PIL import Image
  from tlflax.cli import classify as classify_cli
  from tlflax.cli import convert as convert_cli
  reference = timm_reference("vit_tiny_patch16_224")
  path = str(tmp_path / "vit_tiny.pth")
  torch.save(reference.state_dict(), path)
  output = str(tmp_path / "vit_tiny")
  assert convert_cli.main(["--source", "timm", "--model", "vit_tiny_patch16_224",
                           "--input", path, "--output", output]) == 0
  count = sum(p.numel() for p in reference.parameters())
  assert f"{count:,} parameters" in capsys.readouterr().out
  image = tmp_path / "cat.png"
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 40, 3), np.uint8)).save(image)
  assert classify_cli.main(["--weights", output, "--image_size", "32", "--top_k", "2",
                            str(image)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("vit_tiny_patch16_224 with tlflax checkpoint")
  assert len(lines) == 4 and "%" in lines[2] and "%" in lines[3]


@pytest.mark.slow
def test_features_command_line(small_file, tmp_path):
  # pylint: disable=import-outside-toplevel
  from tlflax.cli import features as features_cli
  from tlflax.data import digits
  from tlflax.inference import features
  path, _ = small_file
  data_dir = str(tmp_path / "tfds")
  digits.prepare("source", data_dir)
  output = str(tmp_path / "features")
  assert features_cli.main([
      "--config", os.path.join(REPO, "configs", "digits.py"), "--output", output,
      "--stage", "pre_logits", "--splits", "eval", "--config.model.name=vit_test",
      f"--config.data.data_dir={data_dir}", f"--config.init.weights={path}",
      "--config.init.source=timm", "--config.eval_batch_size=100"]) == 0
  eval_x, _ = features.load(output, "eval")
  assert eval_x.shape == (180, 32)


# ----------------------------------------------------------------------------
# Training: a staged LP-FT run and a freeze-depth sweep
# ----------------------------------------------------------------------------

def digits_config(small_file):
  """One or two steps of the small pretrained ViT on the offline digits at 32 px."""
  config = defaults.base_config()
  config.model.name = "vit_test"
  config.data.source, config.data.name = "digits", "target"
  config.data.train_examples_per_class = 5
  config.data.image_size = SIZE
  config.data.mean = config.data.std = (0.5, 0.5, 0.5)
  config.init.weights, config.init.source = small_file[0], "timm"
  config.batch_size, config.eval_batch_size = 16, 32
  config.num_train_steps = 2
  config.log_every_steps = 1
  return config


def changed_paths(before, after):
  before, after = flatten(before), flatten(after)
  return {p for p, v in after.items() if not np.array_equal(v, before[p])}


@pytest.mark.slow
def test_staged_lp_ft_run(small_file, tmp_path):
  # pylint: disable=import-outside-toplevel
  from tlflax import stages, training
  from tlflax.training import checkpoint
  config = digits_config(small_file)
  config.stages = stages.lp_ft(1, 1, probe_learning_rate=0.1, fine_tune_learning_rate=0.01,
                               unit="steps")
  workdir = str(tmp_path / "run")
  result = training.train_and_evaluate(config, workdir)
  assert result["step"] == 2 and result["start"] == "pretrained"
  initial = build.build(config, num_classes=5).variables["params"]
  probe = checkpoint.restore_params_only(os.path.join(workdir, "stages", "linear_probe"))
  final = checkpoint.restore_params_only(workdir)
  # The probe trained the head only (the LayerNorms included: frozen means not updated).
  assert changed_paths(initial, probe["params"]) == {"head/kernel", "head/bias"}
  # Fine-tuning moved every parameter.
  assert changed_paths(probe["params"], final["params"]) == set(flatten(final["params"]))


@pytest.mark.slow
def test_freeze_depth_sweep(small_file, tmp_path):
  # pylint: disable=import-outside-toplevel
  from tlflax import sweeps
  from tlflax.training import checkpoint
  import json  # pylint: disable=import-outside-toplevel
  config = digits_config(small_file)
  config.num_train_steps = 1
  # The frozen prefix's token sequences come from the cache (input_stage).
  config.data.augment = "none"
  config.prefix_cache.enabled = True
  config.prefix_cache.directory = str(tmp_path / "cache")
  points = sweeps.make_points([{"freeze.rules": f"depth:{k}"} for k in (2, 4)], config)
  rows = sweeps.run_sweep(config, points, str(tmp_path / "sweep"))
  infos = [json.load(open(tmp_path / "cache" / e / "info.json", encoding="utf-8"))
           for e in os.listdir(tmp_path / "cache")]
  assert sorted({i["stage"] for i in infos}) == ["stage2", "stage4"]
  assert [r.point for r in rows] == ["freeze_rules-depth_2", "freeze_rules-depth_4"]
  assert all(0 <= r.accuracy <= 1 and r.steps == 1 and r.start == "pretrained" for r in rows)
  initial = build.build(config, num_classes=5).variables["params"]
  for depth, row in zip((2, 4), rows):
    trained = checkpoint.restore_params_only(str(tmp_path / "sweep" / row.point))["params"]
    moved = {p.split("/")[0] for p in changed_paths(initial, trained)}
    assert moved == {"head", *[f"stage{i}" for i in range(depth + 1, 5)]}, depth
