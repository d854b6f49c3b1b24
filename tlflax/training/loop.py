"""`train_and_evaluate(config, workdir)`: the training loop of one run.

Start-up order (what makes preempted and staged jobs restartable):
  1. resume from `WORKDIR/checkpoints` if a checkpoint is there;
  2. else initialise from `config.init.weights` (its head kept when it
     predicts this task's classes, else a new head; see `tlflax.build`);
  3. else from scratch.
Steps 2-3 are `tlflax.build.build`.
The log says which one happened.

The loop position is a function of the step alone (epoch = step //
steps_per_epoch, batch = step % steps_per_epoch; dropout keys fold in the
step), and the data order is a function of (seed, epoch), so a resumed run
computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tlflax import build, compilation, data, defaults, freeze, optim, sharding, steps
from tlflax import stages as stages_lib
from tlflax.training import checkpoint, metrics, preemption, prefix_cache
from tlflax.training import workdir as workdir_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


@dataclasses.dataclass
class Setup:
  """Everything a run builds before its first step."""
  model: Any
  train_data: Any
  eval_data: Any
  stages: list[stages_lib.Stage]
  variables: Any  # the starting variables (before any resume)
  start: str  # "resumed", "pretrained" or "scratch"

  @property
  def total_steps(self) -> int:
    return self.stages[-1].end


@dataclasses.dataclass
class StageRun:
  """One stage, compiled: its freezing, optimizer, jitted steps and data."""
  stage: stages_lib.Stage
  freezing: freeze.Freezing
  tx: Any
  train_step: Any
  eval_step: Any
  train_data: Any
  eval_data: Any
  cached_stage: str | None  # the frozen prefix read from the prefix cache


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


def setup(config, resume: bool) -> Setup:
  """Data, model, the stage plan and the starting variables (steps 2-3 above).

  Everything that can be checked before training is checked here, before
  the run writes anything into its workdir: the config's keys and numbers,
  the data, the model and its weights, and every stage's freeze rules and
  optimizer.
  """
  # Keys outside the schema and numbers out of range (tlflax.defaults).
  defaults.check_config(config)
  sharding.check_batch_size(config.batch_size)
  sharding.check_batch_size(config.eval_batch_size, "eval_batch_size")
  train_data, eval_data = build_datasets(config)
  # A resumed run restores its own state: pretrained weights are not read.
  built = build.build(config, train_data.num_classes, read_weights=not resume,
                      class_names=train_data.class_names)
  plan = stages_lib.plan(config, train_data.steps_per_epoch,
                         total_train_steps(config, train_data.steps_per_epoch),
                         built.model.stage_names)
  for stage in plan:
    stages_lib.make_stage_optimizer(
        stage, compile_freezing(config, stage, built.model, built.variables["params"]))
  return Setup(built.model, train_data, eval_data, plan, built.variables,
               "resumed" if resume else built.start)


def compile_freezing(config, stage: stages_lib.Stage, model, params) -> freeze.Freezing:
  """The stage's freeze spec compiled against the model's parameters (`freeze.compile_spec`)."""
  try:
    return freeze.compile_spec(stage.freeze, params, model.stage_names,
                               config.freeze.batchnorm_mode)
  except ValueError as e:
    where = f"Stage {stage.name!r}" if stage.name != "train" else "config.freeze.rules"
    raise ValueError(f"{where}: {e}") from e


def build_stage(config, run: Setup, stage: stages_lib.Stage, variables, mesh) -> StageRun:
  """Compiles one stage: freezing, optimizer, steps, and its prefix cache if enabled."""
  freezing = compile_freezing(config, stage, run.model, variables["params"])
  tx = stages_lib.make_stage_optimizer(stage, freezing)
  model, train_data, eval_data = run.model, run.train_data, run.eval_data
  cached_stage = None
  if config.prefix_cache.enabled:
    cached_stage = prefix_cache.frozen_prefix(model, freezing, variables["params"])
    if cached_stage is None:
      log.info("Stage %s: no frozen prefix, so no prefix cache.", stage.name)
    elif train_data.augment != "none":
      log.warning("Stage %s: prefix cache skipped: data.augment=%r is random; set "
                  "data.augment='none' to train from cached features.", stage.name,
                  train_data.augment)
      cached_stage = None
  if cached_stage is not None:
    host_variables = sharding.host_copy(variables)
    caches = []
    for split, dataset in (("train", train_data), ("eval", eval_data)):
      features, labels, hit = prefix_cache.prefix_outputs(
          config.model.name, model, host_variables, dataset, config.data, split,
          cached_stage, config.eval_batch_size, config.prefix_cache.directory,
          model_options=config.model.get("options", ""))
      caches.append(prefix_cache.cached_dataset(dataset, features, labels))
      log.info("Stage %s: %s features of %s (%s) %s the prefix cache.", stage.name,
               cached_stage, split, "x".join(map(str, features.shape)),
               "read from" if hit else "written to")
    train_data, eval_data = caches
    model = model.clone(input_stage=cached_stage)

  replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  # The steps: pure functions, jitted with explicit shardings; state donated.
  # Images arrive as uint8 and are normalised inside the jitted steps.
  # The seed's dropout key is an argument, not a constant of the program, so
  # runs that differ only in their seed (a sweep's seeds) compile once
  # (`tlflax.compilation.use_persistent_cache`).
  jitted_train_step = jax.jit(
      steps.make_train_step(model, tx, freezing, config.label_smoothing,
                            prepare_images=train_data.device_transform()),
      in_shardings=(replicated, batch_sharded, replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)
  # As key data, a host array: every process replicates the same value.
  dropout_key = sharding.replicate(np.asarray(jax.random.key_data(jax.random.key(config.seed))),
                                   mesh)

  def train_step(state, batch):
    return jitted_train_step(state, batch, dropout_key)

  eval_step = jax.jit(steps.make_eval_step(model, eval_data.device_transform()),
                      in_shardings=(replicated, batch_sharded), out_shardings=replicated)
  log.info("Stage %s (%d of %d): steps %d-%d, %s\n%s", stage.name, stage.index + 1,
           len(run.stages), stage.start + 1, stage.end, "freeze " + str(stage.freeze),
           freezing.summary(stage.optimizer.learning_rate))
  return StageRun(stage, freezing, tx, train_step, eval_step, train_data, eval_data,
                  cached_stage)


def initial_state(config, run: Setup, ckpt: checkpoint.Checkpointer, mesh
                  ) -> tuple[StageRun, steps.TrainState]:
  """The state to start from (fresh or resumed) and the stage it belongs to."""
  latest = ckpt.latest_step()
  stage = stages_lib.stage_of_state(run.stages, latest or 0)
  variables = run.variables
  if latest is not None:
    # The stage's freezing and optimizer give the template to restore into.
    freezing = compile_freezing(config, stage, run.model, variables["params"])
    template = steps.create_train_state(
        variables, stages_lib.make_stage_optimizer(stage, freezing), freezing)
    state, extra = ckpt.restore(template)
    saved = (extra.get("stage", "train"), extra.get("stage_start", 0))
    if saved != (stage.name, stage.start):
      raise checkpoint.CheckpointError(
          f"The checkpoint at step {latest} in {ckpt.directory} was written in stage "
          f"{saved[0]!r} (from step {saved[1]}), but this config puts step {latest} in "
          f"stage {stage.name!r} (from step {stage.start}): the stages changed since. "
          "Restore the original config, or train in a new workdir.")
    if latest == stage.end and len(run.stages) > 1:  # killed between the two saves
      eval_metrics = {k.split("/", 1)[1]: v for k, v in (ckpt.metrics(latest) or {}).items()}
      save_finished_stage(config, ckpt.workdir, stage, state, eval_metrics)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
  current = build_stage(config, run, stage, variables, mesh)
  if latest is None:
    state = steps.create_train_state(variables, current.tx, current.freezing)
  log.info("Start: %s (step %d of %d, stage %s)", run.start, int(state.step),
           run.total_steps, stage.name)
  return current, sharding.replicate(state, mesh)


def next_stage(config, run: Setup, current: StageRun, state, mesh) -> tuple[StageRun, Any]:
  """Moves a state into the next stage: new freezing and optimizer, carried state."""
  stage = run.stages[current.stage.index + 1]
  host_state = sharding.host_copy(state)
  upcoming = build_stage(config, run, stage,
                         {"params": host_state.params, "batch_stats": host_state.batch_stats},
                         mesh)
  trainable, _ = upcoming.freezing.split(host_state.params)
  opt_state = stages_lib.carry_optimizer_state(
      host_state.opt_state, current.freezing, upcoming.tx.init(trainable),
      upcoming.freezing, reset=stage.reset_optimizer)
  return upcoming, sharding.replicate(host_state.replace(opt_state=opt_state), mesh)


def save_finished_stage(config, workdir: str, stage: stages_lib.Stage, state,
                        eval_metrics: dict[str, float]) -> None:
  """Keeps the state at the end of a stage in `WORKDIR/stages/<name>` (for later studies)."""
  # A best_metric makes orbax keep the metrics with the step.
  with checkpoint.Checkpointer(os.path.join(workdir, "stages", stage.name), keep=1,
                               best_metric=config.best_metric, config=config,
                               async_save=False) as kept:
    if kept.latest_step() != stage.end:
      kept.save(stage.end, state, extra={"stage": stage.name},
                metrics={f"eval/{k}": v for k, v in eval_metrics.items()} or None)


def evaluate(eval_step, state, eval_data, mesh) -> dict[str, float]:
  totals = None
  for batch in eval_data.batches(epoch=0):
    sums = eval_step(state, sharding.to_global(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(float, totals)
  count = max(totals["count"], 1.0)
  result = {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}
  if getattr(eval_data, "skip_bad_files", False):
    # Images that failed to decode are masked out (data.skip_bad_files): an
    # evaluation over fewer examples is another number, so it says so.
    result["skipped_files"] = eval_data.num_examples - totals["count"]
    if totals["count"] == 0:
      raise ValueError(f"None of the {eval_data.num_examples} evaluation images could be "
                       "decoded (data.skip_bad_files=True skipped them all); check the eval "
                       "split's files.")
    if result["skipped_files"]:
      log.warning("Evaluation left out %d of %d examples whose files fail to decode: its "
                  "accuracy is over the other %d.", result["skipped_files"],
                  eval_data.num_examples, totals["count"])
  return result


def check_finite(step: int, step_metrics: dict, ckpt: checkpoint.Checkpointer) -> None:
  """Raises `NonFiniteLossError` if step `step` gave a non-finite loss or state.

  Reading the metrics waits for that step to finish on the device.
  """
  loss = float(step_metrics["loss"])
  if not math.isfinite(loss) or not bool(step_metrics["state_finite"]):
    # The bad state is never saved; the last good checkpoint stays.
    what = f"The training loss became {loss}" if not math.isfinite(loss) else (
        "The update made parameters or BatchNorm statistics non-finite")
    raise non_finite_error(what, step, ckpt)


def non_finite_error(what: str, step: int, ckpt: checkpoint.Checkpointer) -> NonFiniteLossError:
  """The error of a run whose loss or state became NaN or infinite, with how to go on."""
  good = ckpt.latest_step()
  if good is None:
    how = ("No checkpoint was saved before it, so the next run starts afresh: run the same "
           "command again with a lower learning rate (--config.optimizer.learning_rate, or "
           "the stages' learning_rate in config.stages), or check the data.")
  else:
    loss = (ckpt.metrics(good) or {}).get("eval/loss")
    evaluated = f", eval loss {loss:.4g}" if loss is not None else ""
    how = (f"The last good checkpoint, step {good}{evaluated}, stays in {ckpt.directory}: "
           "run the same command again with a lower learning rate "
           "(--config.optimizer.learning_rate, or the stages' learning_rate in "
           f"config.stages) and it resumes from step {good} with the new settings.")
  return NonFiniteLossError(f"{what} at step {step}; stopping without saving it. {how}")


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains and evaluates one run; returns its final evaluation metrics.

  Args:
    config: a config from `configs/` (see `tlflax.defaults.base_config`).
    workdir: where checkpoints, `metrics.jsonl` and TensorBoard files go, and
      at the end of a finished run `result.json` (the returned metrics, as a
      sweep's point records them) and `training_curves.png`; a workdir with a
      checkpoint is resumed, and one whose run has finished answers with its
      stored result if the settings are the same, and refuses other
      settings (`tlflax.training.workdir.check_rerun`). It belongs to one
      run at a time (`tlflax.training.workdir.lock`).

  Returns:
    `{"eval/accuracy": ..., "eval/loss": ..., "step": ..., "start": ...}`;
    a run stopped by SIGTERM or SIGINT (after saving) returns
    `{"step": ..., "preempted": True, "signal": "SIGTERM" | "SIGINT", ...}`;
    a run that had finished before returns its result with
    `"already_finished": True`.
    Many runs (a sweep, a study, an ablation) are `tlflax.sweeps`.

  Raises:
    NonFiniteLossError: the loss, the state or the evaluation became NaN or
      infinite (the bad state is not saved; the message says how to go on).
    ValueError, OSError, CheckpointError, WeightsError: a config, data,
      weights or workdir that cannot be used, or a finished run rerun with
      other settings; raised before anything is written into the workdir
      where it can be checked that early.
  """
  started = time.monotonic()
  workdir = os.path.abspath(workdir)  # orbax wants absolute paths
  # Unset data.mean / data.std become the weights' own pixel scaling, before
  # the rerun check and config.json see the config.
  config = build.with_data_normalization(config)
  sharding.initialize_distributed(config.distributed)
  compilation.use_persistent_cache(config.compilation_cache)
  workdir_lib.usable_workdir(workdir)
  # A workdir with checkpoints is a rerun: a finished run answers with its
  # result (or refuses other settings) here, before anything is built.
  latest = checkpoint.latest_step_on_disk(workdir)
  recorded_total = None if latest is None else checkpoint.recorded_total_steps(workdir, latest)
  if recorded_total is not None:
    finished = workdir_lib.check_rerun(config, workdir, latest, recorded_total)
    if finished is not None:
      return _with_result_file(workdir, finished)
  # Checked and built before anything is written: a refused start leaves no trace.
  run = setup(config, resume=latest is not None)
  if latest is not None and recorded_total is None:  # checkpoints older than that record
    finished = workdir_lib.check_rerun(config, workdir, latest, run.total_steps)
    if finished is not None:
      return _with_result_file(workdir, finished)
  mesh = sharding.make_mesh()
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(workdir_lib.lock(workdir))
    ckpt = cleanup.enter_context(checkpoint.Checkpointer(
        workdir, keep=config.keep_checkpoints, best_metric=config.best_metric,
        total_steps=run.total_steps))
    current, state = initial_state(config, run, ckpt, mesh)
    if jax.process_index() == 0:  # on record once the start is known to work
      workdir_lib.write_config(workdir, config, resumed_at=ckpt.latest_step())
      workdir_lib.write_class_names(workdir, run.train_data.class_names)
      metrics.remove_result(workdir)  # an earlier finish's result: this run goes on
    if preemption.install_preemption_handler():
      cleanup.callback(preemption.uninstall_preemption_handler)
    writer = metrics.MetricsWriter(workdir)
    cleanup.callback(writer.close)
    progress = metrics.Progress(run.total_steps, int(state.step), config.batch_size)
    cleanup.callback(progress.close)
    result = _train(config, workdir, run, current, state, ckpt, writer, progress, mesh)
    if not result.get("preempted") and jax.process_index() == 0:
      # Only a finished run has a result.json (what a sweep counts as finished).
      metrics.write_result(workdir, result, time.monotonic() - started)
      metrics.plot_training_curves(
          workdir, [(s.name, s.end) for s in run.stages],
          title=f"{os.path.basename(workdir)}: {config.model.name}, {run.start} start")
    return result


def _with_result_file(workdir: str, finished: dict[str, Any]) -> dict[str, Any]:
  """A finished run's result, its result.json written again if it was lost.

  A run killed between its last checkpoint and its result.json has finished:
  its result comes from the checkpoint, and its run time is unknown (null).
  """
  if jax.process_index() == 0 and not os.path.exists(os.path.join(workdir,
                                                                  metrics.RESULT_FILE)):
    log.warning("%s had finished without a %s; written now from its last checkpoint (its "
                "run time is unknown: wall_seconds null).", workdir, metrics.RESULT_FILE)
    metrics.write_result(workdir, finished, None)
  return finished


def _train(config, workdir: str, run: Setup, current: StageRun, state, ckpt, writer, progress,
           mesh) -> dict[str, Any]:
  """The loop over steps and stages, from `state` to the end (or a preemption)."""
  per_epoch = run.train_data.steps_per_epoch
  eval_every = config.eval_every_steps or per_epoch
  save_every = config.checkpoint_every_steps or per_epoch
  step = int(state.step)
  final, stage_results = {}, {}
  last_saved = step if run.start == "resumed" else None
  unchecked = None  # (step, metrics) of the last step whose loss was not read yet
  skipped_files = None  # data.skip_bad_files: rows that failed to decode since the last line

  while step < run.total_steps:
    if stages_lib.stage_of_next_step(run.stages, step).index != current.stage.index:
      current, state = next_stage(config, run, current, state, mesh)
    stage = current.stage
    stage_label = stage.name if len(run.stages) > 1 else None  # shown in log lines
    learning_rate = optim.schedule_fn(stage.optimizer, stage.num_steps)
    # One stream of batches from this step to the stage's end, across epochs.
    batches = sharding.prefetch_to_mesh(current.train_data.stream(step, stage.end), mesh)
    for batch in batches:
      epoch = step // per_epoch
      if "skipped" in batch:  # rows whose file failed to decode, each replaced (data.pipeline)
        skipped = jnp.sum(batch.pop("skipped"))
        skipped_files = skipped if skipped_files is None else skipped_files + skipped
      new_state, step_metrics = current.train_step(state, batch)
      # Step k is dispatched; reading step k-1's loss now lets the device
      # run k while the host waits, instead of idling between steps.
      if unchecked is not None:
        check_finite(*unchecked, ckpt)
      state, step = new_state, step + 1
      unchecked = (step, step_metrics)
      progress.advance(step)
      stage_done = step == stage.end
      preempted = preemption.preemption_requested(step)
      save_now = step % save_every == 0 or stage_done or preempted
      if (step % config.log_every_steps == 0 or step % eval_every == 0 or save_now):
        # A state is checked before it is logged, evaluated or saved: a bad
        # state is never saved, and the error names its step.
        check_finite(*unchecked, ckpt)
        unchecked = None

      if step % config.log_every_steps == 0 or stage_done:
        values = jax.tree.map(float, step_metrics)
        values.pop("state_finite")
        if skipped_files is not None:
          values["skipped_files"], skipped_files = float(skipped_files), None
        values["images_per_second"] = progress.update(step, values, stage_label)
        values["learning_rate"] = float(learning_rate(step - 1 - stage.start))  # this update's
        values["stage"] = float(stage.index)
        writer.write(step, "train", values)
      if step % eval_every == 0 or stage_done:
        final = evaluate(current.eval_step, state, current.eval_data, mesh)
        writer.write(step, "eval", final)
        progress.evaluated(step, final, stage_label)
      elif save_now:
        # A checkpoint is kept only with a finite evaluation at its step
        # (checked here, not logged: metrics.jsonl keeps its schedule).
        final = evaluate(current.eval_step, state, current.eval_data, mesh)
      if (step % eval_every == 0 or save_now) and not math.isfinite(final["loss"]):
        raise non_finite_error(f"The evaluation loss became {final['loss']}", step, ckpt)
      if stage_done:
        stage_results[stage.name] = {f"eval/{k}": v for k, v in final.items()}
        if len(run.stages) > 1:
          save_finished_stage(config, workdir, stage, state, final)
      if save_now:
        ckpt.save(step, state, extra={"epoch": epoch, "stage": stage.name,
                                      "stage_start": stage.start},
                  metrics={f"eval/{k}": v for k, v in final.items()} or None)
        last_saved = step
      if preempted:
        name = preemption.received_signal() or "SIGTERM"
        log.warning("%s: saved step %d (stage %s) in %s; run the same command again to "
                    "resume.", "Interrupted" if name == "SIGINT" else "Preempted", step,
                    stage.name, workdir)
        ckpt.wait()
        return {"step": step, "preempted": True, "signal": name, "start": run.start,
                "stage": stage.name}
  if unchecked is not None:
    check_finite(*unchecked, ckpt)
  if last_saved != step:
    final = evaluate(current.eval_step, state, current.eval_data, mesh)
    if not math.isfinite(final["loss"]):
      raise non_finite_error(f"The evaluation loss became {final['loss']}", step, ckpt)
    ckpt.save(step, state, extra={"epoch": step // per_epoch, "stage": current.stage.name,
                                  "stage_start": current.stage.start},
              metrics={f"eval/{k}": v for k, v in final.items()})
  ckpt.wait()
  if not final:  # resumed after the last step: evaluate once for the report
    final = evaluate(current.eval_step, state, current.eval_data, mesh)
  result = {"step": step, "start": run.start, **{f"eval/{k}": v for k, v in final.items()}}
  if len(run.stages) > 1:
    result["stages"] = {s.name: stage_results.get(s.name) or finished_stage_metrics(config, workdir, s)
                        for s in run.stages if s.end <= step}
  return result


def finished_stage_metrics(config, workdir: str, stage: stages_lib.Stage) -> dict[str, float]:
  """The evaluation kept with a finished stage's checkpoint (for a resumed run's report)."""
  with checkpoint.Checkpointer(os.path.join(workdir, "stages", stage.name), keep=1,
                               best_metric=config.best_metric) as kept:
    return kept.metrics(stage.end) or {}
