"""The studies as sweep configs: configs/split_study.py and configs/cifar_to_ants.py.

Their points (names, order, groups) and the settings each point trains with,
checked against what the studies' docstrings describe; one short real run of
split_study's points shows that a transfer point starts from its base point's
weights. cifar_to_ants needs ../shared/data and is skipped without it.
"""

import os

import numpy as np
import pytest

from conftest import shared_data
from tlflax import optim
from tlflax import stages as stages_lib
from tlflax import sweeps
from tlflax.cli import train
from tlflax.training import restore_params_only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_STUDY = os.path.join(REPO, "configs", "split_study.py")
CIFAR_TO_ANTS = os.path.join(REPO, "configs", "cifar_to_ants.py")
CURVES = ("AnB", "AnB+", "BnB", "BnB+")
METHODS = ("probe", "depth2", "depth1", "depth0", "full", "lp_ft")


def load(path, *args):
  """A sweep config's module, locked base config and points, as the command line builds them."""
  module = sweeps.load_sweep_module(path)
  config = module.get_config(*args)
  config.lock()
  return module, config, sweeps.make_points(module.sweep(), config)


def by_name(points):
  return {p.name: p for p in points}


def test_split_study_points_are_baseA_baseB_then_each_curve_and_k_per_seed():
  _, _, points = load(SPLIT_STUDY)
  expected = ["baseA", "baseB__seed-0", "baseB__seed-1", "baseB__seed-2"] + [
      f"{curve}{k}__seed-{seed}" for curve in CURVES for k in range(1, 5) for seed in range(3)]
  assert [p.name for p in points] == expected and len(points) == 52
  assert "AnB3__seed-1" in expected and "BnB+4__seed-2" in expected
  # One results.md row per baseA, baseB and (curve, k), the seeds averaged within it.
  groups = {p.name: p.overrides.get("group", "") for p in points}
  assert groups["baseA"] == "" and groups["baseB__seed-2"] == "baseB"
  assert groups["AnB3__seed-1"] == "AnB3" and groups["BnB+2__seed-0"] == "BnB+2"
  assert len(set(groups.values())) == 1 + 1 + 16


def test_split_study_point_configs_copy_freeze_and_start_as_the_study_says(tmp_path):
  module, config, points = load(SPLIT_STUDY)
  points, workdir = by_name(points), str(tmp_path)
  run = lambda name: sweeps.point_config(config, points[name], workdir)  # noqa: E731

  base_a = run("baseA")  # all of digits 0-4, from scratch, seed 0
  assert (base_a.data.name, base_a.data.train_examples_per_class, base_a.batch_size) == (
      "source", 0, 64)
  assert base_a.num_train_steps == base_a.eval_every_steps == base_a.checkpoint_every_steps == 150
  assert (base_a.seed, base_a.init.weights) == (0, "")
  base_b = run("baseB__seed-1")  # the target set from scratch
  assert (base_b.data.name, base_b.data.train_examples_per_class, base_b.batch_size) == (
      "target", 20, 20)
  assert base_b.num_train_steps == base_b.eval_every_steps == 80
  assert (base_b.seed, base_b.init.weights, base_b.freeze.rules) == (1, "", "none")

  anb3 = run("AnB3__seed-1")  # stem, stage1, stage2 copied from baseA and frozen
  assert (anb3.init.weights, anb3.init.source) == (os.path.join(workdir, "baseA"), "workdir")
  assert (anb3.init.up_to_stage, anb3.freeze.rules, anb3.seed) == ("stage2", "depth:2", 1)
  assert (anb3.data.name, anb3.num_train_steps, anb3.batch_size) == ("target", 80, 20)
  anb3_plus = run("AnB+3__seed-1")  # the same, fine-tuned
  assert (anb3_plus.init.up_to_stage, anb3_plus.freeze.rules) == ("stage2", "none")
  bnb1 = run("BnB1__seed-2")  # stem copied from the baseB of the same seed, frozen
  assert bnb1.init.weights == os.path.join(workdir, "baseB__seed-2")
  assert (bnb1.init.up_to_stage, bnb1.freeze.rules, bnb1.seed) == ("stem", "depth:0", 2)
  anb4 = run("AnB4__seed-0")
  assert (anb4.init.up_to_stage, anb4.freeze.rules) == ("stage3", "depth:3")
  for name in ("baseA", "BnB+4__seed-0"):
    common = run(name)
    assert common.model.name == "cifar_resnet20" and common.data.augment == "none"
    assert common.prefix_cache.enabled and common.prefix_cache.directory == ""
    assert (common.optimizer.learning_rate, common.optimizer.weight_decay,
            common.optimizer.warmup_steps) == (0.05, 5e-4, 10)
  assert module.SWEEP_X == "init.up_to_stage"


def test_list_prints_one_command_per_split_study_point(tmp_path, capsys):
  status = train.main(["--config", SPLIT_STUDY, "--workdir", str(tmp_path),
                       "--config.num_train_steps=1", "--list"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert status == 0 and len(lines) == 52
  assert lines[0].endswith("--config.num_train_steps=1 --point=0")
  assert lines[51].endswith("--point=51") and "split_study.py" in lines[51]
  assert (tmp_path / "sweep.json").exists()


def test_a_split_study_transfer_point_starts_from_its_base_points_weights(tmp_path):
  _, config, points = load(SPLIT_STUDY)
  with config.unlocked():
    config.num_train_steps = 1
    config.batch_size = 16  # 20 does not divide over the tests' 8 CPU devices
    config.optimizer.warmup_steps = 0  # so that the one step moves every trainable weight
    config.prefix_cache.directory = str(tmp_path / "prefix_cache")  # not the user's cache
  # baseA overrides the length too; the runs otherwise train as configured.
  tiny = [{**p.overrides, "num_train_steps": 1} if "num_train_steps" in p.overrides
          else p.overrides for p in points]
  points = by_name(sweeps.make_points(tiny, config))
  assert optim.learning_rate_schedule(config.optimizer, 1)(0) == 0.05  # the one step's rate
  workdir = tmp_path / "sweep"
  # In sweep order, baseA first. Seed 1, so that a fresh stage is not baseA's (seed 0) init.
  for name in ("baseA", "AnB3__seed-1"):
    assert sweeps.run_point(config, points[name], str(workdir))["metrics"]["step"] == 1

  base_a = restore_params_only(workdir / "baseA")["params"]
  anb3 = restore_params_only(workdir / "AnB3__seed-1")["params"]
  assert set(anb3) == set(base_a) >= {"stem", "stage1", "stage2", "stage3"}
  for unit in ("stem", "stage1", "stage2"):  # copied from baseA and frozen: unchanged
    for a, b in zip(flat(base_a[unit]), flat(anb3[unit]), strict=True):
      np.testing.assert_array_equal(a, b)
  # stage3 is freshly initialised and trained, not baseA's.
  assert not any(np.array_equal(a, b)
                 for a, b in zip(flat(base_a["stage3"]), flat(anb3["stage3"]), strict=True))


def flat(tree):
  """The arrays of a nested dict, in key order."""
  if isinstance(tree, dict):
    return [leaf for key in sorted(tree) for leaf in flat(tree[key])]
  return [np.asarray(tree)]


def test_cifar_to_ants_names_the_missing_data(tmp_path):
  module = sweeps.load_sweep_module(CIFAR_TO_ANTS)  # importing needs no data
  with pytest.raises(FileNotFoundError, match=r"resnet56-4bfd9763\.th and .*hymenoptera are "
                                              r"missing.*cifar_to_ants\.py:/path/to/shared/data"):
    module.get_config(str(tmp_path))


def test_cifar_to_ants_points_are_each_method_pretrained_and_random_per_seed():
  shared_data("cifar10-resnets", "resnet56-4bfd9763.th")
  shared_data("hymenoptera")
  _, _, points = load(CIFAR_TO_ANTS)
  expected = [f"{method}-{init}__seed-{seed}" for method in METHODS
              for init in ("pretrained", "random") for seed in range(3)]
  assert [p.name for p in points] == expected and len(points) == 36
  groups = [p.overrides["group"] for p in points]
  assert len(set(groups)) == 12 and groups[:4] == ["probe-pretrained"] * 3 + ["probe-random"]


def test_cifar_to_ants_point_configs_are_the_studys_runs():
  weights = shared_data("cifar10-resnets", "resnet56-4bfd9763.th")
  images = shared_data("hymenoptera")
  _, config, points = load(CIFAR_TO_ANTS)
  points = by_name(points)
  run = lambda name: sweeps.point_config(config, points[name], "/unused")  # noqa: E731

  probe = run("probe-pretrained__seed-0")
  assert os.path.samefile(probe.init.weights, weights) and probe.init.source == "torchvision"
  assert (probe.freeze.rules, probe.seed, probe.model.name) == ("linear_probe", 0,
                                                                "cifar_resnet56")
  assert os.path.samefile(probe.data.path, images)
  assert (probe.data.source, probe.data.train_split, probe.data.eval_split) == (
      "folder", "train", "val")
  assert (probe.data.image_size, probe.data.resize_size, probe.data.augment) == (32, 32, "none")
  assert (probe.batch_size, probe.eval_batch_size) == (32, 64)
  assert probe.num_train_steps == probe.eval_every_steps == probe.checkpoint_every_steps == 70
  assert (probe.optimizer.learning_rate, probe.optimizer.weight_decay,
          probe.optimizer.warmup_steps) == (0.03, 5e-4, 5)
  assert probe.prefix_cache.enabled and probe.prefix_cache.directory == ""
  random = run("depth1-random__seed-2")
  assert (random.init.weights, random.init.source) == ("", "")
  assert (random.freeze.rules, random.seed) == ("depth:1", 2)
  assert run("full-pretrained__seed-1").freeze.rules == "none"

  # LP-FT: 23 steps of linear probe at 0.03, then 47 of everything at 0.01: 70 in all.
  lp_ft = run("lp_ft-random__seed-1")
  assert lp_ft.init.weights == "" and lp_ft.seed == 1
  plan = stages_lib.plan(lp_ft, steps_per_epoch=7, total_steps=lp_ft.num_train_steps)
  assert [(s.name, s.start, s.end, s.freeze, s.optimizer.learning_rate,
           s.optimizer.warmup_steps) for s in plan] == [
               ("linear_probe", 0, 23, "linear_probe", 0.03, 5),
               ("fine_tune", 23, 70, "none", 0.01, 5)]
  assert os.path.samefile(run("lp_ft-pretrained__seed-0").init.weights, weights)
