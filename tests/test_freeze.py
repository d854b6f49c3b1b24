"""Freeze rules: matching, helpers on ResNet and VGG, BatchNorm modes, summary."""

import jax
import jax.numpy as jnp
import pytest

from tlflax import freeze, models

IMAGES = jnp.zeros((1, 32, 32, 3))


def shapes(name, **options):
  model = models.get_model(name, **options)
  return model, jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES))


def frozen_top_level(freezing):
  """Top-level modules all of whose parameters are frozen."""
  by_module = {}
  for path, multiplier in freezing.path_multiplier.items():
    by_module.setdefault(path.split("/")[0], set()).add(multiplier == 0)
  return sorted(m for m, states in by_module.items() if states == {True})


def test_first_match_wins_and_mask_tree_is_exact():
  _, variables = shapes("cifar_resnet20")
  rules = [("stage1/block1/.*", "trainable"), ("stage1/.*", "frozen"), ("stem/.*", 0.5),
           (".*", "trainable")]
  freezing = freeze.compile_rules(rules, variables["params"])
  labels = freezing.labels()
  assert labels["stage1"]["block1"]["conv1"]["kernel"] == "lr_x1"
  assert labels["stage1"]["block2"]["conv1"]["kernel"] == "frozen"
  assert labels["stem"] == {"conv": {"kernel": "lr_x0.5"},
                            "bn": {"scale": "lr_x0.5", "bias": "lr_x0.5"}}
  mask = freezing.trainable_mask()
  assert jax.tree.structure(mask) == jax.tree.structure(variables["params"])
  assert mask["stage1"]["block3"] == {
      "conv1": {"kernel": False}, "bn1": {"scale": False, "bias": False},
      "conv2": {"kernel": False}, "bn2": {"scale": False, "bias": False}}


def test_unmatched_parameter_is_an_error_naming_it():
  _, variables = shapes("cifar_resnet20")
  with pytest.raises(ValueError, match=r"match no freeze rule, e.g. head/(bias|kernel)"):
    freeze.compile_rules([("st.*", "frozen")], variables["params"])
  with pytest.raises(ValueError, match="not a valid regex"):
    freeze.compile_rules([("(stem", "frozen")], variables["params"])
  with pytest.raises(ValueError, match="Unknown freeze rule 'melt'"):
    freeze.compile_rules([(".*", "melt")], variables["params"])


@pytest.mark.parametrize("depth, frozen", [
    (0, ["stem"]), (1, ["stage1", "stem"]), (2, ["stage1", "stage2", "stem"]),
    (4, ["stage1", "stage2", "stage3", "stage4", "stem"])])
def test_freeze_depth_on_resnet(depth, frozen):
  model, variables = shapes("resnet18")
  freezing = freeze.compile_rules(freeze.freeze_depth(model.stage_names, depth),
                                  variables["params"])
  assert frozen_top_level(freezing) == frozen
  assert "head" not in frozen_top_level(freezing)


def test_freeze_depth_on_vgg_has_no_stem():
  model, variables = shapes("vgg11_bn")
  freezing = freeze.compile_rules(freeze.freeze_depth(model.stage_names, 2),
                                  variables["params"])
  assert frozen_top_level(freezing) == ["stage1", "stage2"]
  with pytest.raises(ValueError, match="out of range.*0..6"):
    freeze.freeze_depth(model.stage_names, 7)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_helpers_on_resnet_and_vgg(name):
  model, variables = shapes(name)
  params = variables["params"]

  probe = freeze.compile_rules(freeze.linear_probe(), params)
  assert sorted({p.split("/")[0] for p in probe.trainable_paths}) == ["head"]

  surgical = freeze.compile_rules(freeze.surgical(model.stage_names, "stage2"), params)
  assert sorted({p.split("/")[0] for p in surgical.trainable_paths}) == ["head", "stage2"]

  norms = freeze.compile_rules(freeze.batchnorm_only(), params)
  assert all(p.startswith("head/") or p.endswith(("/scale", "/bias")) and "bn" in p
             for p in norms.trainable_paths)
  assert any("/bn" in p for p in norms.trainable_paths)
  assert not any(p.endswith("/kernel") and not p.startswith("head/")
                 for p in norms.trainable_paths)

  decay = freeze.compile_rules(freeze.layerwise_lr_decay(model.stage_names, 0.5), params)
  last, first = model.stage_names[-1], model.stage_names[0]
  multipliers = decay.path_multiplier
  assert multipliers["head/kernel"] == 1.0
  assert {m for p, m in multipliers.items() if p.startswith(last + "/")} == {0.5}
  assert {m for p, m in multipliers.items() if p.startswith(first + "/")} == {
      0.5 ** len(model.stage_names)}


def test_discriminative_groups():
  _, variables = shapes("resnet18")
  rules = freeze.discriminative({"stem|stage1": 0.1, "stage2": 0.0})
  freezing = freeze.compile_rules(rules, variables["params"])
  assert freezing.path_multiplier["stem/conv/kernel"] == 0.1
  assert freezing.path_multiplier["stage1/block1/conv1/kernel"] == 0.1
  assert freezing.path_multiplier["stage2/block1/conv1/kernel"] == 0.0
  assert freezing.path_multiplier["stage3/block1/conv1/kernel"] == 1.0


def test_specs_from_config_strings():
  model, _ = shapes("resnet18")
  names = model.stage_names
  assert freeze.rules_from_spec("depth:2", names) == freeze.freeze_depth(names, 2)
  assert freeze.rules_from_spec("linear_probe", names) == freeze.linear_probe()
  assert freeze.rules_from_spec("none", names) == [(".*", "trainable")]
  assert freeze.rules_from_spec("lld:0.7", names) == freeze.layerwise_lr_decay(names, 0.7)
  assert freeze.rules_from_spec([["head/.*", 1], [".*", None]], names) == [
      ("head/.*", 1), (".*", None)]
  with pytest.raises(ValueError, match="Unknown freeze spec 'deep:2'"):
    freeze.rules_from_spec("deep:2", names)
  with pytest.raises(ValueError, match="depth:9.*out of range"):
    freeze.rules_from_spec("depth:9", names)


def test_batchnorm_modes_select_layers():
  model, variables = shapes("cifar_resnet20")
  rules = freeze.freeze_depth(model.stage_names, 1)
  keras_rule = freeze.compile_rules(rules, variables["params"])
  patterns = keras_rule.frozen_batchnorm(variables["batch_stats"])
  assert "stem/bn" in patterns and r"stage1/block3/bn2" in patterns
  assert not any(p.startswith("stage2") for p in patterns)
  everything = freeze.compile_rules(rules, variables["params"], batchnorm_mode="all")
  assert everything.frozen_batchnorm(variables["batch_stats"]) == (".*",)
  adapt = freeze.compile_rules(rules, variables["params"], batchnorm_mode="none")
  assert adapt.frozen_batchnorm(variables["batch_stats"]) == ()
  with pytest.raises(ValueError, match="batchnorm_mode"):
    freeze.compile_rules(rules, variables["params"], batchnorm_mode="some")


def test_summary_table_counts_parameters():
  _, variables = shapes("cifar_resnet20")
  freezing = freeze.compile_rules(freeze.linear_probe(), variables["params"])
  table = freezing.summary(base_learning_rate=0.1)
  assert "head/.*" in table and "650" in table and "trainable" in table
  assert "269,072" in table and "frozen" in table  # 269,722 - 650
  assert "269,722" in table


def test_per_block_rules_on_a_vit_and_per_stage_rules_elsewhere():
  """A ViT's stage names carry its blocks: `lld:` decays per block, `surgical:` takes one."""
  model, variables = shapes("vit_b_16", image_size=32)
  blocks = freeze.model_blocks(model.stage_names)
  assert len(blocks) == 12 and blocks[:4] == ("stage1/block1", "stage1/block2",
                                              "stage1/block3", "stage2/block1")
  lld = freeze.compile_rules(freeze.rules_from_spec("lld:0.9", model.stage_names),
                             variables["params"]).path_multiplier
  assert lld["head/kernel"] == lld["stage4/norm/scale"] == 1.0
  assert lld["stage4/block3/mlp/fc1/kernel"] == pytest.approx(0.9)
  assert lld["stage2/block1/norm2/bias"] == pytest.approx(0.9 ** 9)
  assert lld["stem/class_token"] == pytest.approx(0.9 ** 13)
  one = freeze.compile_rules(freeze.rules_from_spec("surgical:stage3/block2", model.stage_names),
                             variables["params"])
  assert {"/".join(p.split("/")[:2]) for p in one.trainable_paths} == {
      "stage3/block2", "head/kernel", "head/bias"}
  assert frozen_top_level(freeze.compile_rules(freeze.freeze_depth(model.stage_names, 4),
                                               variables["params"])) == [
      "stage1", "stage2", "stage3", "stage4", "stem"]
  # A CNN's stage names carry no blocks: per stage, as before.
  resnet, _ = shapes("resnet18")
  assert freeze.model_blocks(resnet.stage_names) == ()
  assert freeze.layerwise_lr_decay(resnet.stage_names, 0.5) == [
      ("head/.*", 1.0), ("(stage4)/.*", 0.5), ("(stage3)/.*", 0.25), ("(stage2)/.*", 0.125),
      ("(stage1)/.*", 0.0625), ("(stem)/.*", 0.03125)]
  with pytest.raises(ValueError, match="'stage1/block1' is not a stage of this model"):
    freeze.surgical(resnet.stage_names, "stage1/block1")
