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


def define_flags(argv: Sequence[str]) -> flags.FlagValues:
  """The command's flags; `argv` names the `--config.KEY` overrides to define."""
  flag_values = app.new_flags()
  config_flags.DEFINE_config_file("config", None, "A get_config() file in configs/.",
                                  flag_values=flag_values, lock_config=True,
                                  sys_argv=[PROGRAM, *argv])
  flags.DEFINE_string("output", None, "Directory for the .npy files and info.json.",
                      flag_values=flag_values)
  flags.DEFINE_string("stage", "pre_logits", "stem, stageK, fc (VGG), pre_logits or logits.",
                      flag_values=flag_values)
  flags.DEFINE_list("splits", ["train", "eval"], "Comma-separated: train, eval or both.",
                    flag_values=flag_values)
  flags.DEFINE_enum("pool", "avg", ["avg", "none"], "avg: global average of spatial maps; "
                    "none: keep (H, W, C).", flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Replace features of a different extraction in "
                    "--output.", flag_values=flag_values)
  flags.mark_flags_as_required(["config", "output"], flag_values=flag_values)
  return flag_values


def _extract(values) -> None:
  from tlflax.inference import features  # pylint: disable=import-outside-toplevel
  info = features.extract_to_directory(values.config, values.output, values.stage,
                                       values.splits, values.pool, values.overwrite)
  shapes = ", ".join(f"{name} {tuple(split['features_shape'])}"
                     for name, split in info["splits"].items())
  print(f"Wrote {values.stage} features of {values.config.model.name} to {values.output}: "
        f"{shapes}")


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  values = define_flags(argv)
  return app.run(PROGRAM, values, lambda _: _extract(values), argv)


if __name__ == "__main__":
  sys.exit(main())
