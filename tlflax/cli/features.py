"""Write one stage's outputs for a dataset: a pretrained network as a standalone extractor.

    python -m tlflax.cli.features --config configs/digits.py --output features/digits \\
        --config.init.weights=workdirs/digits --config.init.source=workdir --stage stage3

See `tlflax.inference.features` for what is written and how it is computed.
"""

import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from tlflax.cli import app

PROGRAM = "tlflax.cli.features"
FLAGS = app.new_flags()
_CONFIG = config_flags.DEFINE_config_file("config", None, "A get_config() file in configs/.",
                                          flag_values=FLAGS, lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the .npy files and info.json.",
                              flag_values=FLAGS)
_STAGE = flags.DEFINE_string("stage", "pre_logits", "stem, stageK, fc (VGG), pre_logits or "
                             "logits.", flag_values=FLAGS)
_SPLITS = flags.DEFINE_list("splits", ["train", "eval"], "Comma-separated: train, eval or both.",
                            flag_values=FLAGS)
_POOL = flags.DEFINE_enum("pool", "avg", ["avg", "none"], "avg: global average of spatial maps; "
                          "none: keep (H, W, C).", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace features of a different extraction "
                               "in --output.", flag_values=FLAGS)
flags.mark_flags_as_required(["config", "output"], flag_values=FLAGS)


def _extract(_) -> None:
  from tlflax.inference import features  # pylint: disable=import-outside-toplevel
  info = features.extract_to_directory(_CONFIG.value, _OUTPUT.value, _STAGE.value,
                                       _SPLITS.value, _POOL.value, _OVERWRITE.value)
  shapes = ", ".join(f"{name} {tuple(split['features_shape'])}"
                     for name, split in info["splits"].items())
  print(f"Wrote {_STAGE.value} features of {_CONFIG.value.model.name} to {_OUTPUT.value}: "
        f"{shapes}")


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  return app.run(PROGRAM, FLAGS, _extract, argv)


if __name__ == "__main__":
  sys.exit(main())
