"""configs/hymenoptera.py and its PyTorch reference (experiments/hymenoptera_pytorch.py).

The study's numbers are only comparable if the reference does what tlflax
does: these tests hold its learning-rate schedule to optax's, its freezing to
tlflax's freeze rules (parameter for parameter), and its new head to flax's
initialiser; and the config to the schema.
"""

import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tlflax import build, freeze, models, optim
from tlflax.sweeps import points as points_lib

lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import hymenoptera_pytorch as reference  # pylint: disable=wrong-import-position


def study_module():
  spec = importlib.util.spec_from_file_location("hymenoptera", REPO / "configs" / "hymenoptera.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(name="study_config")
def fixture_study_config(tmp_path):
  (tmp_path / "hymenoptera").mkdir()
  return study_module(), study_module().get_config(str(tmp_path))


def test_every_point_is_a_valid_run(study_config):
  study, config = study_config
  points = points_lib.make_points(study.sweep(), config)
  assert len(points) == len(study.RECIPES) * len(study.SEEDS)
  assert {p.overrides["group"] for p in points} == set(study.RECIPES)
  assert len(study.SEEDS) >= 5  # issue 22: at least five seeds a recipe
  # The weights' own scaling, written out: (x - 127) / 128.
  resolved = build.with_data_normalization(config)
  np.testing.assert_allclose(np.asarray(resolved.data.mean) * 255, 127, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(resolved.data.std) * 255, 128, rtol=1e-12)


def test_missing_images_name_the_folder_and_the_way_on(tmp_path):
  with pytest.raises(FileNotFoundError, match="hymenoptera is missing.*configs/hymenoptera.py:"
                                              "/path/to/shared/data"):
    study_module().get_config(str(tmp_path))


@pytest.mark.parametrize("peak, warmup, total", [(0.01, 3, 35), (0.03, 0, 7), (0.1, 5, 6)])
def test_reference_schedule_is_tlflaxs(peak, warmup, total):
  config = optim.default_config()
  config.learning_rate, config.warmup_steps = peak, warmup
  ours = optim.learning_rate_schedule(config, total)
  for step in range(total + 2):
    assert math.isclose(reference.schedule(peak, warmup, total, step), float(ours(step)),
                        rel_tol=1e-6, abs_tol=1e-9), step


@pytest.mark.parametrize("rules", ["none", "depth:2", "depth:5", "linear_probe"])
def test_reference_freezes_what_tlflax_freezes(rules):
  """Per part (stem, stage1..7, top, head): trainable parameter counts agree."""
  model = models.get_model("efficientnet_lite0", num_classes=2)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))["params"]
  freezing = freeze.compile_rules(freeze.rules_from_spec(rules, model.stage_names), params)
  ours = {}
  for path, multiplier in freezing.path_multiplier.items():
    if multiplier > 0:
      part = path.split("/")[0]
      size = int(np.prod(_leaf(params, path).shape))
      ours[part] = ours.get(part, 0) + size

  torch_model = reference.build_model(None, 2)
  reference.set_trainable(torch_model, reference.frozen_count(rules))
  names = ["stem", *[f"stage{k}" for k in range(1, 8)], "top", "head"]
  theirs = {}
  for name, group in zip(names, reference.parts(torch_model)):
    count = sum(p.numel() for module in group for p in module.parameters() if p.requires_grad)
    if count:
      theirs[name] = count
  assert theirs == ours


def _leaf(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def test_reference_head_starts_as_flaxs_dense():
  """LeCun normal truncated at 2 sd: the same spread as flax's Dense kernel."""
  torch.manual_seed(0)
  head = reference.new_head(1280, 500)
  flax_kernel = jax.nn.initializers.lecun_normal()(jax.random.key(0), (1280, 500))
  ours, theirs = np.asarray(flax_kernel), head.weight.detach().numpy()
  assert np.all(head.bias.detach().numpy() == 0)
  assert abs(theirs.std() / ours.std() - 1) < 0.01  # 640 000 draws each: sd known to 0.1%
  limit = 2 * math.sqrt(1 / 1280) / 0.87962566103423978
  assert np.abs(theirs).max() <= limit + 1e-7 and np.abs(ours).max() <= limit + 1e-6


def test_config_sets_every_key_the_reference_reads():
  study = study_module()
  for name in ("IMAGE_SIZE", "RESIZE_SIZE", "BATCH_SIZE", "TOTAL_STEPS", "STEPS_PER_EPOCH",
               "LEARNING_RATE", "WARMUP_STEPS", "WEIGHT_DECAY", "MEAN", "STD", "WEIGHTS"):
    assert hasattr(study, name), name
  assert study.STEPS_PER_EPOCH == 245 // study.BATCH_SIZE
