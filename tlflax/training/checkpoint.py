"""Training checkpoints in WORKDIR/checkpoints: resume, keep the best, survive kills.

A thin layer over `orbax.checkpoint.CheckpointManager`. The layout:

    WORKDIR/config.json                  the run's config (written by process 0)
    WORKDIR/checkpoints/<step>/state     the TrainState (params, batch_stats,
                                         opt_state, step)
    WORKDIR/checkpoints/<step>/extra     JSON the loop passes: stage, epoch,
                                         data position...
    WORKDIR/checkpoints/<step>/metrics   JSON metrics of that step (ranks the best)

Atomicity comes from orbax: a step is written into
`<step>.orbax-checkpoint-tmp-<time>/` and renamed to `<step>/` only once
every file is complete (on object stores a `commit_success.txt` marks
completion instead). A run killed mid-save leaves only the temporary
directory, which `latest_step` and `restore` never see and the next start
deletes, so a restart resumes from the last complete checkpoint.

    >>> ckpt = Checkpointer(workdir, keep=3, best_metric="eval/accuracy", config=config)
    >>> if ckpt.latest_step() is not None:
    ...   state, extra = ckpt.restore(state)
    >>> ckpt.save(step, state, extra={"epoch": 3}, metrics={"eval/accuracy": 0.9})
    >>> ckpt.close()  # waits for the last (asynchronous) save
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_manager, checkpoint_managers

from tlflax import tree
from tlflax.training import workdir as workdir_lib

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = workdir_lib.CHECKPOINT_DIR
CONFIG_FILE = workdir_lib.CONFIG_FILE
STATE_ITEM = "state"
EXTRA_ITEM = "extra"
TOTAL_STEPS_KEY = "total_steps"  # in a checkpoint's extra: the run's last step

# Metric names that mean "lower is better" when no mode is given.
_LOWER_IS_BETTER = ("loss", "error", "perplexity", "nll")


CheckpointError = workdir_lib.CheckpointError


# ----------------------------------------------------------------------------
# The checkpointer
# ----------------------------------------------------------------------------

class Checkpointer:
  """Saves and restores TrainStates in `WORKDIR/checkpoints`.

  Every process of a multi-process run must create it and call `save` and
  `restore` alike (orbax coordinates the processes); only process 0 writes
  `config.json`.

  Attributes:
    workdir: the run's directory.
    directory: `WORKDIR/checkpoints`.
    best_metric: metric that ranks checkpoints (None: keep the latest only).
    best_mode: "max" or "min" (None without `best_metric`).
  """

  def __init__(self, workdir: str | os.PathLike, keep: int | None = 3,
               best_metric: str | None = None, best_mode: str = "auto",
               config: Any = None, async_save: bool = True, total_steps: int | None = None):
    """Opens (creating if needed) the checkpoints of a workdir.

    Args:
      workdir: the run's directory; it must not be a file.
      keep: how many of the latest checkpoints to keep (None keeps all).
      best_metric: also keep the checkpoint with the best value of this metric
        (a key of the `metrics` passed to `save`), even when it is older than
        the last `keep`; "" or None turns this off.
      best_mode: "max", "min", or "auto" ("min" when the name contains loss,
        error, perplexity or nll, else "max").
      config: the run's config (ConfigDict or dict), written to
        `WORKDIR/config.json` by process 0; None writes nothing.
      async_save: write checkpoints in a background thread (`save` returns once
        the arrays are copied off the devices).
      total_steps: the run's last step, recorded in every checkpoint's extra
        (as "total_steps"), so that a later start tells a finished run from
        one stopped mid-way without building anything (`recorded_total_steps`).

    Raises:
      CheckpointError: `workdir` or `workdir/checkpoints` is a file.
      ValueError: `keep` < 1 or an unknown `best_mode`.
    """
    if keep is not None and keep < 1:
      raise ValueError(f"keep={keep}: keep at least one checkpoint (or None for all).")
    self.workdir = workdir_lib.usable_workdir(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    self.best_metric = best_metric or None
    self.best_mode = resolve_best_mode(best_metric, best_mode) if best_metric else None

    policies = [checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if self.best_metric:
      best_fn = _metric_getter(self.best_metric, self.best_mode)
      # Checkpoints without the metric rank worst (see `_metric_getter`), so
      # the single best one is always a checkpoint that was evaluated.
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=self.best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True,
        # Unfinished steps of a killed run are never restored; delete them.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        # orbax writes metrics (and reports best_step) only when best_fn is
        # set; which checkpoints survive is decided by the policy above alone.
        best_fn=best_fn,
        best_mode=self.best_mode or "max",
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=_handler_registry())
    self._metrics_saved_here: dict[int, dict[str, float]] = {}
    self.total_steps = None if total_steps is None else int(total_steps)
    if config is not None and jax.process_index() == 0:
      workdir_lib.write_config(self.workdir, config, resumed_at=self.latest_step())

  # -- queries ----------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best `best_metric`, or None (no metric, none evaluated)."""
    if not self.best_metric:
      return None
    step = self._manager.best_step()
    if step is None or _metric_value(self.metrics(step), self.best_metric) is None:
      return None
    return step

  def metrics(self, step: int) -> dict[str, float] | None:
    """The metrics saved with a step (None when there were none)."""
    if step in self._metrics_saved_here:  # its files may still be being written
      return self._metrics_saved_here[step]
    return self._manager.metrics(step)

  # -- saving -----------------------------------------------------------------

  def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None,
           metrics: Mapping[str, Any] | None = None) -> bool:
    """Writes a checkpoint (in the background unless `async_save=False`).

    Older checkpoints beyond `keep` are deleted, except the best one.

    Args:
      step: the global step; must increase from checkpoint to checkpoint.
      state: the TrainState (any pytree of arrays).
      extra: JSON-serialisable facts to resume with (stage, epoch, data
        position...); numpy and jax scalars are converted.
      metrics: scalar metrics of this step, e.g. {"eval/accuracy": 0.9}; the
        one named `best_metric` ranks the checkpoint.

    Returns:
      True if saved; False when `step` is the latest checkpoint already (a
      second save of the same step, e.g. a final save after a periodic one).

    Raises:
      ValueError: `step` is older than the latest checkpoint, or `extra` or
        `metrics` cannot be written as JSON.
    """
    step = int(step)
    latest = self.latest_step()
    if latest is not None and step <= latest:
      if step == latest:
        logger.debug("Step %d is already checkpointed in %s.", step, self.directory)
        return False
      raise ValueError(
          f"Cannot save step {step}: {self.directory} already holds the newer step "
          f"{latest}. Steps must increase across a run (count steps globally over "
          "stages), or use a fresh workdir.")
    extra = dict(extra or {})
    if self.total_steps is not None:
      extra.setdefault(TOTAL_STEPS_KEY, self.total_steps)
    extra_json = _to_json(extra, "extra")
    metrics_json = _metrics_to_json(metrics)
    if self.best_metric and metrics_json is None:
      # An empty record ranks worst; it also spares orbax's warning about
      # checkpoints saved without metrics.
      metrics_json = {}
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                 EXTRA_ITEM: ocp.args.JsonSave(extra_json)})
    saved = bool(self._manager.save(step, args=args, metrics=metrics_json))
    if saved and metrics_json is not None:
      self._metrics_saved_here[step] = metrics_json
    return saved

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and deletions, then releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # -- restoring --------------------------------------------------------------

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Reads a checkpoint into the structure of `template`.

    Args:
      template: a state of the right structure, e.g. a freshly created
        TrainState (its values are not used; its shardings are: jax arrays are
        restored with the template's sharding), or the same with
        `jax.ShapeDtypeStruct` leaves.
      step: which checkpoint; None for the latest.

    Returns:
      `(state, extra)`: the state with the template's pytree structure
      (TrainState, optax namedtuples, MaskedNode...) and bit-identical arrays,
      and the `extra` dict saved with it.

    Raises:
      CheckpointError: no such checkpoint, or one whose variables differ from
        the template's (named, with what to do).
    """
    step = self._existing_step(step)
    saved = self._manager.item_metadata(step)[STATE_ITEM]
    if saved is None:
      raise CheckpointError(f"Step {step} in {self.directory} holds no training state "
                            f"(no '{STATE_ITEM}' item); it was not written by tlflax.")
    problem = describe_mismatch(_metadata_leaves(saved), _template_leaves(template))
    if problem:
      raise CheckpointError(self._mismatch_message(step, problem))
    args = ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(jax.tree_util.tree_map(_abstract, template)),
        EXTRA_ITEM: ocp.args.JsonRestore()})
    try:
      restored = self._manager.restore(step, args=args)
    except ValueError as e:  # e.g. optax states that differ only in empty nodes
      first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise CheckpointError(self._mismatch_message(step, first_line)) from e
    return restored[STATE_ITEM], dict(restored[EXTRA_ITEM] or {})

  def _existing_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"No complete checkpoint in {self.directory}.")
    if step is None:
      return steps[-1]
    if int(step) not in steps:
      raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; "
                            f"complete checkpoints: {steps}.")
    return int(step)

  def _mismatch_message(self, step: int, problem: str) -> str:
    return (f"The checkpoint of step {step} in {self.directory} does not fit the state "
            f"this run builds:\n{problem}\n"
            "It was written by a run with another model, number of classes, freeze "
            "stage or optimizer. Resume with the config that wrote it (see "
            f"{os.path.join(self.workdir, CONFIG_FILE)}), or use a fresh workdir and "
            "start from its weights (restore_params_only / init.weights).")


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  # Without a registry, a manager that has not saved yet does not know how to
  # read its items: metadata comes back as None until the first save.
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state_handler = ocp.handlers.StandardCheckpointHandler()
  registry.add(STATE_ITEM, ocp.args.StandardSave, state_handler)
  registry.add(STATE_ITEM, ocp.args.StandardRestore, state_handler)
  extra_handler = ocp.handlers.JsonCheckpointHandler()
  registry.add(EXTRA_ITEM, ocp.args.JsonSave, extra_handler)
  registry.add(EXTRA_ITEM, ocp.args.JsonRestore, extra_handler)
  return registry


# ----------------------------------------------------------------------------
# Weights of a finished run
# ----------------------------------------------------------------------------

def restore_params_only(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
  """The `{"params", "batch_stats"}` of a training checkpoint, as numpy arrays.

  Reads only those two subtrees, so no optimizer (or its template) is needed:
  for a later stage or feature extraction to start from a finished run.

  Args:
    path: a workdir, its `checkpoints` directory, or one step's directory
      (`WORKDIR/checkpoints/<step>`).
    step: which checkpoint of a workdir; None for the latest. Must be None
      when `path` is a step directory.

  Returns:
    `{"params": ..., "batch_stats": ...}` nested dicts of numpy arrays
    (`batch_stats` is {} for models without BatchNorm).

  Raises:
    CheckpointError: `path` holds no complete checkpoint (or not `step`).
  """
  step_dir = _find_step_dir(os.path.abspath(os.fspath(path)), step)
  state_dir = os.path.join(step_dir, STATE_ITEM)
  # The handler reads the item's tree metadata; a Checkpointer would also look
  # for step metadata, which lives one level up, and warn.
  saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
  tree = saved.tree if hasattr(saved, "tree") else saved
  wanted = {name: tree.get(name) or {} for name in ("params", "batch_stats")}
  item = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        wanted)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                    partial_restore=True))
  return {name: restored.get(name) or {} for name in wanted}


def latest_step_on_disk(workdir: str | os.PathLike) -> int | None:
  """The newest complete checkpoint's step in `WORKDIR/checkpoints`, without creating anything.

  Lets a run decide whether it resumes before it writes a single file.
  """
  root = os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)
  if not os.path.isdir(root):
    return None
  steps = [m.step for m in ocp.path.step.standard_name_format().find_all(root)]
  return max(steps) if steps else None


def recorded_total_steps(workdir: str | os.PathLike, step: int) -> int | None:
  """The run's last step as checkpoint `step` of a workdir records it (see `Checkpointer`).

  Reads one small JSON file: nothing is built or written. None for a
  checkpoint written before tlflax recorded it.
  """
  extra = _read_json_item(_find_step_dir(os.path.abspath(os.fspath(workdir)), step), EXTRA_ITEM)
  total = (extra or {}).get(TOTAL_STEPS_KEY)
  return None if total is None else int(total)


def saved_metrics(path: str | os.PathLike, step: int | None = None) -> dict[str, float]:
  """The metrics saved with a checkpoint ({} when none were), read without opening a manager.

  Args:
    path: a workdir (or a finished stage's directory), its checkpoints
      directory, or one step's directory.
    step: which checkpoint; None for the latest.
  """
  step_dir = _find_step_dir(os.path.abspath(os.fspath(path)), step)
  return _read_json_item(step_dir, checkpoint_manager.METRIC_ITEM_NAME,
                         filename=checkpoint_manager.METRIC_ITEM_NAME) or {}


def _read_json_item(step_dir: str, item: str, filename: str | None = None) -> Any:
  """A JSON item of one step's directory, as the handler that wrote it reads it (None if absent)."""
  item_dir = epath.Path(step_dir) / item
  if not item_dir.exists():
    return None
  options = {"filename": filename} if filename else {}
  return ocp.handlers.JsonCheckpointHandler(**options).restore(item_dir)


def _find_step_dir(path: str, step: int | None) -> str:
  if not os.path.isdir(path):
    what = "does not exist" if not os.path.exists(path) else "is a file"
    raise CheckpointError(f"{path!r} {what}; pass a workdir, its checkpoints directory "
                          "or one step's directory.")
  if os.path.isdir(os.path.join(path, STATE_ITEM)):  # a step directory
    if step is not None:
      raise CheckpointError(f"{path!r} is one step's directory; pass its workdir to "
                            f"choose step {step}.")
    return path
  root = os.path.join(path, CHECKPOINT_DIR)
  root = root if os.path.isdir(root) else path
  # The finder CheckpointManager uses: unfinished (temporary) steps are skipped.
  steps = sorted(m.step for m in ocp.path.step.standard_name_format().find_all(root))
  if not steps:
    raise CheckpointError(f"No complete training checkpoint under {path!r}.")
  if step is None:
    step = steps[-1]
  if int(step) not in steps:
    raise CheckpointError(f"No checkpoint for step {step} under {path!r}; "
                          f"complete checkpoints: {steps}.")
  return os.path.join(root, str(int(step)))


# ----------------------------------------------------------------------------
# Structure checks
# ----------------------------------------------------------------------------

def _template_leaves(template) -> dict[str, tuple[tuple[int, ...], str]]:
  return {path: (tuple(np.shape(x)), _dtype_name(x))
          for path, x in tree.leaves_with_paths(template).items()}


def _dtype_name(leaf) -> str:
  dtype = getattr(leaf, "dtype", None)  # arrays and ShapeDtypeStructs
  return str(np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype)


def _metadata_leaves(saved) -> dict[str, tuple[tuple[int, ...], str]]:
  saved = saved.tree if hasattr(saved, "tree") else saved
  return {path: (tuple(m.shape), str(np.dtype(m.dtype)))
          for path, m in tree.leaves_with_paths(saved).items() if hasattr(m, "shape")}


def describe_mismatch(saved: Mapping[str, tuple], wanted: Mapping[str, tuple],
                      limit: int = 6) -> str | None:
  """Lists the variables only one side has and those whose shape or dtype differ.

  Args:
    saved: path -> (shape, dtype), for the checkpoint.
    wanted: path -> (shape, dtype), for the template.
    limit: how many paths to name per kind of difference.

  Returns:
    A readable multi-line description, or None when they agree.
  """
  only_saved, only_wanted, differing = tree.differences(saved, wanted)
  if not (only_saved or only_wanted or differing):
    return None
  parts = sorted({k.split("/")[0] for k in only_saved + only_wanted + differing})
  lines = [f"  differences in: {', '.join(parts)}"]
  for title, keys in (("in the checkpoint only", only_saved),
                      ("in this run's state only", only_wanted)):
    if keys:
      lines.append(tree.listing(title, keys, limit))
  for key in differing[:limit]:
    lines.append(f"  {key}: checkpoint {saved[key][0]} {saved[key][1]}, "
                 f"this run {wanted[key][0]} {wanted[key][1]}")
  if len(differing) > limit:
    lines.append(f"  ... and {len(differing) - limit} more with another shape or dtype")
  return "\n".join(lines)


def _abstract(leaf):
  # Shape, dtype and sharding are all orbax needs; the template's values are
  # never read, and real arrays would be copied for nothing.
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


# ----------------------------------------------------------------------------
# Best metric
# ----------------------------------------------------------------------------

def resolve_best_mode(best_metric: str, mode: str = "auto") -> str:
  """"max" or "min" for a metric: explicit, or guessed from its name.

  Args:
    best_metric: e.g. "eval/accuracy" or "eval/loss".
    mode: "max", "min" or "auto".

  Returns:
    "min" for "auto" when the name contains loss, error, perplexity or nll;
    "max" otherwise.
  """
  if mode in ("max", "min"):
    return mode
  if mode != "auto":
    raise ValueError(f"Unknown best_mode {mode!r}; use 'max', 'min' or 'auto'.")
  name = best_metric.lower()
  return "min" if any(word in name for word in _LOWER_IS_BETTER) else "max"


def _metric_value(metrics, name: str) -> float | None:
  value = (metrics or {}).get(name)
  if value is None:
    return None
  value = float(value)
  return None if math.isnan(value) else value


def _metric_getter(name: str, mode: str):
  worst = -math.inf if mode == "max" else math.inf

  def get(metrics) -> float:
    # Missing or NaN values rank below every real one, so they are never "best".
    value = _metric_value(metrics, name)
    return worst if value is None else value

  return get


# ----------------------------------------------------------------------------
# JSON and config
# ----------------------------------------------------------------------------

def _to_json(value: Any, what: str) -> Any:
  """`value` with numpy/jax scalars turned into Python numbers; checked for JSON."""
  try:
    return tree.to_json(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"The checkpoint's {what} must be JSON-serialisable: {e}") from e


def _metrics_to_json(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
  if metrics is None:
    return None
  try:
    return {str(k): float(v) for k, v in metrics.items()}
  except (TypeError, ValueError) as e:
    raise ValueError(f"Checkpoint metrics must be scalars: {e}") from e


