"""Fit a grid of linear probes on features written by `python -m tlflax.cli.features`.

    python -m tlflax.cli.linear_probe --features features/digits \\
        --learning_rates 1e-3,1e-2,1e-1 --weight_decays 0,1e-4,1e-3 --steps 500

Prints both accuracy grids and the best point, and writes
`DIR/linear_probe.json`; see `tlflax.inference.linear_probe` for the objective.
"""

import os
import sys
from typing import Sequence

from absl import flags

from tlflax import files
from tlflax.cli import app

PROGRAM = "tlflax.cli.linear_probe"
FLAGS = app.new_flags()
_FEATURES = flags.DEFINE_string("features", None, "Directory written by python -m "
                                "tlflax.cli.features (train and eval).", flag_values=FLAGS)
_LEARNING_RATES = flags.DEFINE_list("learning_rates", ["1e-3", "1e-2", "1e-1"],
                                    "Comma-separated Adam learning rates.", flag_values=FLAGS)
_WEIGHT_DECAYS = flags.DEFINE_list("weight_decays", ["0", "1e-4", "1e-3"],
                                   "Comma-separated L2 strengths.", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 500, "Optimizer steps per head.", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Rows per step; 0 = the whole train split "
                                   "every step.", lower_bound=0, flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Minibatch order.", flag_values=FLAGS)
flags.mark_flag_as_required("features", flag_values=FLAGS)


def numbers(values: Sequence[str], flag: str) -> list[float]:
  """`["1e-3", "0.1"]` -> `[0.001, 0.1]`, or a ValueError naming the flag."""
  try:
    return [float(v) for v in values if v.strip()]
  except ValueError as e:
    raise ValueError(f"--{flag} expects comma-separated numbers, got {','.join(values)!r}."
                     ) from e


def _fit(_) -> None:
  # pylint: disable=import-outside-toplevel
  from tlflax.inference import features, linear_probe
  directory = _FEATURES.value
  info = features.read_info(directory)
  train_x, train_y = features.load(directory, "train")
  val_x, val_y = features.load(directory, "eval")
  num_classes = int(info.get("num_classes") or max(train_y.max(), val_y.max()) + 1)
  result = linear_probe.fit_grid(
      train_x, train_y, val_x, val_y, num_classes,
      numbers(_LEARNING_RATES.value, "learning_rates"),
      numbers(_WEIGHT_DECAYS.value, "weight_decays"), steps=_STEPS.value,
      batch_size=_BATCH_SIZE.value or None, seed=_SEED.value)
  extraction = info.get("extraction", {})
  print(f"Linear probes on {extraction.get('model')} {extraction.get('stage')} features "
        f"({train_x.shape[0]} train, {val_x.shape[0]} eval examples, {num_classes} classes), "
        f"{result.steps} steps each.")
  print("\nEval accuracy (%):\n" + linear_probe.format_grid(result))
  print("\nTrain accuracy (%):\n" + linear_probe.format_grid(result, "train_accuracy"))
  print(f"\nBest: learning rate {result.best_learning_rate:g}, weight decay "
        f"{result.best_weight_decay:g}: eval accuracy {100 * result.best_val_accuracy:.2f}%")
  path = os.path.join(directory, linear_probe.RESULT_FILE)
  files.write_json(path, {"features": extraction, **linear_probe.result_summary(result)})
  print(f"Wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  return app.run(PROGRAM, FLAGS, _fit, argv)


if __name__ == "__main__":
  sys.exit(main())
