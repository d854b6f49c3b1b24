"""What freezing saves: step time, FLOPs and memory per freeze depth, three ways.

For each model, one table with a row per configuration (inference forward,
full fine-tuning, freeze depth 1..N, head only) and these columns, all
measured in the same run on the same machine:

* tlflax: our step (gradient of the trainable subtree only);
* usual: the same step done the usual way (full gradient, frozen updates
  zeroed by `optax.partition` with `set_to_zero`);
* usual+norm: the usual way plus logging the gradient norm, which reads the
  full gradient, as most training loops do;
* torch: torchvision with `requires_grad=False` on frozen parameters and
  `eval()` on frozen BatchNorm layers (torchvision's ResNets only).

Train steps are jitted with the state donated, as in `tlflax.training`. Times are
medians of `--steps` steps after one warm-up; FLOPs and peak memory
come from XLA's analysis of the compiled step. Ratios are to our forward pass.

    .venv/bin/python benchmarks/freeze_cost.py                        # the default models
    .venv/bin/python benchmarks/freeze_cost.py --models resnet18 --size 128
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlflax import freeze, models, optim, steps

DEFAULT_MODELS = (("resnet18", 64), ("resnet50", 64), ("cifar_resnet56", 32),
                  ("convnext_tiny", 64), ("vit_tiny_patch16_224", 64))


def median_seconds(run, n: int) -> float:
  run()  # warm-up (and compilation)
  times = []
  for _ in range(n):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def xla_costs(jitted, *args) -> tuple[float, float]:
  """(GFLOPs, peak MiB) of a jitted function's compiled form."""
  compiled = jitted.lower(*args).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  memory = compiled.memory_analysis()
  peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
          + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  return analysis["flops"] / 1e9, peak / 2**20


def make_usual_step(model, tx_full, freezing, read_full_gradient: bool):
  """Full gradient of every parameter; frozen updates zeroed by the optimizer."""

  def train_step(state, batch):
    step_model = steps.with_frozen_batchnorm(model, freezing, state.batch_stats)

    def loss_fn(params):
      logits, new_state = step_model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"],
          train=True, mutable=["batch_stats"])
      return steps.cross_entropy(logits, batch["label"]), new_state["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx_full.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss}
    if read_full_gradient:
      metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state), metrics

  return train_step


def configurations(model):
  depths = len([s for s in model.stage_names if s != "stem"])
  yield "full fine-tuning", freeze.full_fine_tuning()
  for k in range(1, depths):
    yield f"freeze depth {k}", freeze.freeze_depth(model.stage_names, k)
  yield "head only", freeze.linear_probe()


def measure_jax(name, size, batch_size, n_steps):
  model = models.get_model(name, num_classes=10)
  if hasattr(model, "image_size"):  # a ViT: position embeddings for this input size
    model = models.get_model(name, num_classes=10, image_size=size)
  rng = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rng.randn(batch_size, size, size, 3), jnp.float32),
           "label": jnp.asarray(rng.randint(0, 10, batch_size))}
  variables = model.init(jax.random.key(0), batch["image"][:1])
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  flops, memory = xla_costs(forward, variables, batch["image"])
  seconds = median_seconds(lambda: forward(variables, batch["image"]).block_until_ready(),
                           n_steps)
  rows = [dict(config="inference forward", ours=(seconds, flops, memory))]
  config = {"name": "sgd", "learning_rate": 0.01, "schedule": "constant"}
  for label, rules in configurations(model):
    freezing = freeze.compile_rules(rules, variables["params"])
    row = dict(config=label, rules=rules)
    tx = optim.make_optimizer(config, freezing, 1000)
    state = steps.create_train_state(variables, tx, freezing)
    row["ours"] = time_step(steps.make_train_step(model, tx, freezing), state, batch, n_steps)
    tx_full = optim.make_optimizer(config, freezing, 1000, full_tree=True)
    full_state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                  batch_stats=variables.get("batch_stats", {}),
                                  opt_state=tx_full.init(variables["params"]))
    for key, read in (("usual", False), ("usual+norm", True)):
      row[key] = time_step(make_usual_step(model, tx_full, freezing, read),
                           full_state, batch, n_steps)
    rows.append(row)
  return rows


def time_step(step, state, batch, n_steps):
  # Donated state, as in the training loop: otherwise every step copies the
  # (frozen) parameters it returns unchanged.
  jitted = jax.jit(step, donate_argnums=0)
  flops, memory = xla_costs(jitted, state, batch)
  holder = {"state": jax.tree.map(jnp.copy, state)}  # the caller's arrays stay valid

  def run():
    holder["state"], metrics = jitted(holder["state"], batch)
    jax.block_until_ready(metrics)

  return median_seconds(run, n_steps), flops, memory


def measure_torch(name, size, batch_size, rows, n_steps):
  """The same configurations in PyTorch, where torchvision has the model."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  if not (name.startswith("resnet") and hasattr(torchvision.models, name)):
    return  # the stage table below is torchvision's ResNet layout
  torch.set_num_threads(max(1, torch.get_num_threads()))
  rng = np.random.RandomState(0)
  images = torch.from_numpy(rng.randn(batch_size, 3, size, size).astype(np.float32))
  labels = torch.from_numpy(rng.randint(0, 10, batch_size))
  for row in rows:
    model = getattr(torchvision.models, name)(num_classes=10)
    if row["config"] == "inference forward":
      model.eval()

      def forward():
        with torch.no_grad():
          model(images)

      row["torch"] = median_seconds(forward, n_steps)
      continue
    torch_freeze(model, row["rules"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)

    def step():
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(images), labels)
      loss.backward()
      optimizer.step()

    row["torch"] = median_seconds(step, n_steps)


# torchvision module names of our stages.
_TORCH_STAGES = {"stem": ("conv1", "bn1"), "stage1": ("layer1",), "stage2": ("layer2",),
                 "stage3": ("layer3",), "stage4": ("layer4",), "head": ("fc",)}


def torch_freeze(model, rules):
  """requires_grad=False on frozen stages, eval() on their BatchNorm layers."""
  import torch  # pylint: disable=import-outside-toplevel
  model.train()
  for ours, theirs in _TORCH_STAGES.items():
    multiplier = next(freeze.rule_multiplier(r) for p, r in rules
                      if re.fullmatch(p, f"{ours}/x"))
    for module_name in theirs:
      module = getattr(model, module_name)
      for parameter in module.parameters():
        parameter.requires_grad = multiplier > 0
      if multiplier == 0:
        for layer in ([module] if isinstance(module, torch.nn.BatchNorm2d)
                      else module.modules()):
          if isinstance(layer, torch.nn.BatchNorm2d):
            layer.eval()


def print_table(name, size, batch_size, rows):
  forward_seconds, forward_flops, _ = rows[0]["ours"]
  print(f"\n## {name}, {size}x{size}, batch {batch_size} "
        f"({jax.devices()[0].platform}, {jax.device_count()} device(s))\n")
  print("| configuration | tlflax ms | x fwd | GFLOP | x fwd | peak MiB | usual ms | usual GFLOP "
        "| usual+norm ms | usual+norm GFLOP | torch ms | tlflax / torch |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for row in rows:
    seconds, flops, memory = row["ours"]
    cells = [row["config"], f"{1e3 * seconds:.1f}", f"{seconds / forward_seconds:.2f}",
             f"{flops:.2f}", f"{flops / forward_flops:.2f}", f"{memory:.0f}"]
    for key in ("usual", "usual+norm"):
      if key in row:
        cells += [f"{1e3 * row[key][0]:.1f}", f"{row[key][1]:.2f}"]
      else:
        cells += ["-", "-"]
    if "torch" in row:
      cells += [f"{1e3 * row['torch']:.1f}", f"{seconds / row['torch']:.2f}"]
    else:
      cells += ["-", "-"]
    print("| " + " | ".join(cells) + " |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="*", help="model names (default: resnet18 resnet50 "
                      "cifar_resnet56)")
  parser.add_argument("--size", type=int, help="image size (default 64, 32 for CIFAR)")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  chosen = ([(m, args.size or (32 if m.startswith("cifar") else 64)) for m in args.models]
            if args.models else [(m, args.size or s) for m, s in DEFAULT_MODELS])
  for name, size in chosen:
    rows = measure_jax(name, size, args.batch, args.steps)
    measure_torch(name, size, args.batch, rows, args.steps)
    print_table(name, size, args.batch, rows)


if __name__ == "__main__":
  main()
