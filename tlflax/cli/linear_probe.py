"""Fit a linear probe on features written by `python -m tlflax.cli.features`.

    python -m tlflax.cli.linear_probe --features features/digits \\
        --learning_rates 1e-3,1e-2,1e-1 --weight_decays 0,1e-4,1e-3 --steps 500

Chooses the learning rate and weight decay by stratified k-fold
cross-validation on the train features, refits the chosen point on all of
them, and scores it on the eval split once. Prints the cross-validation grid,
the choice, the eval accuracy and any grid-edge warning, and writes
`DIR/linear_probe.json`; see `tlflax.inference.linear_probe`.
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
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Rows per step; 0 = all training rows "
                                   "every step.", lower_bound=0, flag_values=FLAGS)
_FOLDS = flags.DEFINE_integer("folds", 5, "Cross-validation folds of the train features that "
                              "choose the grid point (fewer when a class has fewer examples).",
                              lower_bound=2, flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Deals the folds and orders the minibatches.",
                             flag_values=FLAGS)
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
  eval_x, eval_y = features.load(directory, "eval")
  num_classes = int(info.get("num_classes") or max(train_y.max(), eval_y.max()) + 1)
  result = linear_probe.select_and_evaluate(
      train_x, train_y, eval_x, eval_y, num_classes,
      numbers(_LEARNING_RATES.value, "learning_rates"),
      numbers(_WEIGHT_DECAYS.value, "weight_decays"), steps=_STEPS.value,
      batch_size=_BATCH_SIZE.value or None, seed=_SEED.value, folds=_FOLDS.value)
  extraction = info.get("extraction", {})
  chosen = result.chosen_index
  print(f"Linear probes on {extraction.get('model')} {extraction.get('stage')} features "
        f"({result.num_train} train, {result.num_eval} eval examples, {num_classes} classes), "
        f"{result.steps} steps each.")
  print(f"\nCross-validation accuracy (%) on the train features, mean ± sd over "
        f"{result.folds} folds (the eval split takes no part in the choice):\n"
        + linear_probe.format_cv_grid(result))
  print(f"\nChosen: learning rate {result.chosen_learning_rate:g}, weight decay "
        f"{result.chosen_weight_decay:g} (highest mean cross-validation accuracy; "
        f"{linear_probe.TIE_RULE})")
  print(f"Cross-validation accuracy (train features, {result.folds} folds): "
        f"{100 * result.cv_accuracy[chosen]:.2f} ± {100 * result.cv_accuracy_std[chosen]:.2f}%")
  print(f"Refit on all {result.num_train} train examples: train accuracy "
        f"{100 * result.train_accuracy:.2f}%")
  print(f"Eval accuracy (eval split, {result.num_eval} examples, scored once after the "
        f"choice): {100 * result.eval_accuracy:.2f}%")
  for sentence in result.warnings:
    print(f"Warning: {sentence}")
  path = os.path.join(directory, linear_probe.RESULT_FILE)
  files.write_json(path, {"features": extraction, **linear_probe.result_summary(result)})
  print(f"Wrote {path}")


def main(argv: Sequence[str] | None = None, program: str = PROGRAM) -> int:
  """Runs the command line as `program` (how the user typed it); returns the exit status."""
  return app.run(program, FLAGS, _fit, argv, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
