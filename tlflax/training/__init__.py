"""One training run: the loop, its checkpoints, metrics, preemption and prefix cache.

    result = tlflax.training.train_and_evaluate(config, "workdirs/run")

Modules: `loop` (`train_and_evaluate`), `checkpoint` (orbax save, restore,
resume), `workdir` (what a workdir holds, config.json), `metrics`
(metrics.jsonl, TensorBoard, progress), `preemption` (SIGTERM -> save and
stop), `prefix_cache` (the frozen prefix's outputs, computed once).
"""

from tlflax.training.checkpoint import Checkpointer, CheckpointError, restore_params_only
from tlflax.training.loop import NonFiniteLossError, train_and_evaluate
from tlflax.training.metrics import read_metrics

__all__ = ["CheckpointError", "Checkpointer", "NonFiniteLossError", "read_metrics",
           "restore_params_only", "train_and_evaluate"]
