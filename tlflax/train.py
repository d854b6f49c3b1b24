"""`train_and_evaluate(config, workdir)`: the training loop.

Start-up order (what makes preempted and staged jobs restartable):
  1. resume from `WORKDIR/checkpoints` if a checkpoint is there;
  2. else initialise from `config.init.weights` (new head re-initialised);
  3. else from scratch.
The log says which one happened.

The loop position is a function of the step alone (epoch = step //
steps_per_epoch, batch = step % steps_per_epoch; dropout keys fold in the
step), and the data order is a function of (seed, epoch), so a resumed run
computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tlflax import checkpoint, data, freeze, metrics, models, optim, sharding, steps, weights

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


@dataclasses.dataclass
class Setup:
  """Everything a run builds before its first step."""
  model: Any
  train_data: Any
  eval_data: Any
  freezing: freeze.Freezing
  tx: Any
  state: steps.TrainState
  total_steps: int
  start: str  # "resumed", "pretrained" or "scratch"


def total_train_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def build_datasets(config):
  common = dict(seed=config.seed, process_index=jax.process_index(),
                process_count=jax.process_count())
  train_data = data.build(config.data, split="train", training=True,
                          global_batch_size=config.batch_size, **common)
  eval_data = data.build(config.data, split="eval", training=False,
                         global_batch_size=config.eval_batch_size, **common)
  return train_data, eval_data


def initial_variables(config, model, image_shape, workdir_has_checkpoint: bool):
  """Fresh variables, with pretrained weights merged in when configured."""
  variables = jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, *image_shape)))
  variables = jax.tree.map(np.asarray, variables)
  if workdir_has_checkpoint or not config.init.weights:
    return variables, "scratch"
  if config.init.source == "workdir":  # the final state of another training run
    pretrained = checkpoint.restore_params_only(config.init.weights)
  else:
    pretrained = weights.load(config.model.name, config.init.weights,
                              source=config.init.source or None)
  if not config.init.keep_head:
    # A new task gets a new head, even when the old one has the same shape.
    pretrained = {collection: {k: v for k, v in tree.items() if k != "head"}
                  for collection, tree in pretrained.items()}
  variables, report = weights.merge_pretrained(variables, pretrained)
  log.info("Pretrained weights %s: %s", config.init.weights, report)
  return variables, "pretrained"


def setup(config, workdir: str, ckpt: checkpoint.Checkpointer) -> Setup:
  """Data, model, freezing, optimizer and the starting state (steps 1-3 above)."""
  sharding.check_batch_size(config.batch_size)
  sharding.check_batch_size(config.eval_batch_size, "eval_batch_size")
  train_data, eval_data = build_datasets(config)
  model_options = {"last_stage": config.model.last_stage} if config.model.last_stage else {}
  model = models.get_model(config.model.name, num_classes=train_data.num_classes,
                           dtype=config.model.dtype, **model_options)
  size = config.data.image_size
  resume = ckpt.latest_step() is not None
  variables, start = initial_variables(config, model, (size, size, 3), resume)

  rules = freeze.rules_from_spec(config.freeze.rules, model.stage_names)
  freezing = freeze.compile_rules(rules, variables["params"],
                                  batchnorm_mode=config.freeze.batchnorm_mode)
  total_steps = total_train_steps(config, train_data.steps_per_epoch)
  tx = optim.make_optimizer(config.optimizer, freezing, total_steps)
  state = steps.create_train_state(variables, tx, freezing)
  if resume:
    state, _ = ckpt.restore(state)
    start = "resumed"
  log.info("Start: %s (step %d of %d) in %s", start, int(state.step), total_steps, workdir)
  log.info("Freezing:\n%s", freezing.summary(config.optimizer.learning_rate))
  return Setup(model, train_data, eval_data, freezing, tx, state, total_steps, start)


def evaluate(eval_step, state, eval_data, mesh) -> dict[str, float]:
  totals = None
  for batch in eval_data.batches(epoch=0):
    sums = eval_step(state, sharding.to_global(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(float, totals)
  count = max(totals["count"], 1.0)
  return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains and evaluates one run; returns its final evaluation metrics.

  Args:
    config: a config from `configs/` (see `tlflax.defaults.base_config`).
    workdir: where checkpoints, `metrics.jsonl` and TensorBoard files go; a
      workdir with a checkpoint is resumed.

  Returns:
    `{"eval/accuracy": ..., "eval/loss": ..., "step": ..., "start": ...}`; for
    a study config (one with `runs`, see `tlflax.study`), a list of those.
  """
  workdir = os.path.abspath(workdir)  # orbax wants absolute paths
  if config.get("runs"):
    from tlflax import study  # pylint: disable=import-outside-toplevel
    return study.run_study(config, workdir)
  sharding.initialize_distributed(config.distributed)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints,
                                 best_metric=config.best_metric, config=config)
  checkpoint.install_preemption_handler()
  run = setup(config, workdir, ckpt)
  mesh = sharding.make_mesh()
  replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  state = sharding.replicate(run.state, mesh)

  # The steps: pure functions, jitted with explicit shardings; state donated.
  train_step = jax.jit(steps.make_train_step(run.model, run.tx, run.freezing,
                                             config.label_smoothing, config.seed),
                       in_shardings=(replicated, batch_sharded),
                       out_shardings=(replicated, replicated), donate_argnums=0)
  eval_step = jax.jit(steps.make_eval_step(run.model),
                      in_shardings=(replicated, batch_sharded), out_shardings=replicated)

  per_epoch = run.train_data.steps_per_epoch
  eval_every = config.eval_every_steps or per_epoch
  save_every = config.checkpoint_every_steps or per_epoch
  learning_rate = optim.schedule_fn(config.optimizer, run.total_steps)
  writer = metrics.MetricsWriter(workdir)
  progress = metrics.Progress(run.total_steps, int(state.step), config.batch_size)
  step = int(state.step)
  final = {}
  last_saved = step if run.start == "resumed" else None

  try:
    while step < run.total_steps:
      epoch, first_batch = divmod(step, per_epoch)
      for batch in run.train_data.batches(epoch=epoch, start_batch=first_batch):
        batch = sharding.to_global(batch, mesh)
        new_state, step_metrics = train_step(state, batch)
        loss = float(step_metrics["loss"])
        if not math.isfinite(loss) or not bool(step_metrics["state_finite"]):
          # The last good checkpoint stays; the bad state is never saved.
          what = f"Loss became {loss}" if not math.isfinite(loss) else (
              "The update made parameters or BatchNorm statistics non-finite")
          raise NonFiniteLossError(
              f"{what} at step {step + 1}; stopping. The last good checkpoint "
              f"(step {ckpt.latest_step()}) is kept in {workdir}. Lower the learning rate "
              "or check the data.")
        state, step = new_state, step + 1

        if step % config.log_every_steps == 0 or step == run.total_steps:
          values = jax.tree.map(float, step_metrics)
          values.pop("state_finite")
          values["images_per_second"] = progress.update(step, values)
          values["learning_rate"] = float(learning_rate(step))
          writer.write(step, "train", values)
        if step % eval_every == 0 or step == run.total_steps:
          final = evaluate(eval_step, state, run.eval_data, mesh)
          writer.write(step, "eval", final)
          log.info("step %d eval: %s", step, final)
        preempted = checkpoint.preemption_requested(step)
        if step % save_every == 0 or step == run.total_steps or preempted:
          ckpt.save(step, state, extra={"epoch": epoch},
                    metrics={f"eval/{k}": v for k, v in final.items()} or None)
          last_saved = step
        if preempted:
          log.warning("Preempted: saved step %d, exiting; rerun to resume.", step)
          ckpt.wait()
          return {"step": step, "preempted": True, "start": run.start}
        if step >= run.total_steps:
          break
    if last_saved != step:
      ckpt.save(step, state, extra={"epoch": step // per_epoch})
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    progress.close()
  if not final:  # resumed after the last step: evaluate once for the report
    final = evaluate(eval_step, state, run.eval_data, mesh)
  return {"step": step, "start": run.start, **{f"eval/{k}": v for k, v in final.items()}}
