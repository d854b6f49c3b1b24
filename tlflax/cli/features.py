"""Write one stage's outputs for a dataset: a pretrained network as a standalone extractor.

    python -m tlflax.cli.features --config configs/digits.py --output features/digits \\
        --config.init.weights=workdirs/digits --config.init.source=workdir --stage stage3

See `tlflax.inference.features` for what is written and how it is computed.
`--model_option KEY=VALUE` (repeatable) adds to config.model.options, the
network's settings a weight file cannot carry (e.g. transform_input=False).
"""

import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from tlflax import defaults
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
  flags.DEFINE_multi_string("model_option", [], "KEY=VALUE: a setting of the network the "
                            "weights cannot carry, e.g. transform_input=False; repeatable; "
                            "VALUE is a Python literal. Added to config.model.options.",
                            flag_values=flag_values)
  flags.mark_flags_as_required(["config", "output"], flag_values=flag_values)
  return flag_values


def _extract(values) -> None:
  # pylint: disable=import-outside-toplevel
  from tlflax.inference import features
  from tlflax.models import registry
  if values.model_option:
    options = {**registry.parse_model_options(values.config.model.options,
                                              where="config.model.options "),
               **registry.merge_model_options(values.model_option, where="--model_option ")}
    values.config.model.options = registry.format_model_options(options)
  defaults.check_config(values.config, where=values["config"].config_filename.split(":", 1)[0])
  info = features.extract_to_directory(values.config, values.output, values.stage,
                                       values.splits, values.pool, values.overwrite)
  shapes = ", ".join(f"{name} {tuple(split['features_shape'])}"
                     for name, split in info["splits"].items())
  print(f"Wrote {values.stage} features of {values.config.model.name} to {values.output}: "
        f"{shapes}")


def main(argv: Sequence[str] | None = None, program: str = PROGRAM) -> int:
  """Runs the command line as `program` (how the user typed it); returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  values = define_flags(argv)
  return app.run(program, values, lambda _: _extract(values), argv, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
