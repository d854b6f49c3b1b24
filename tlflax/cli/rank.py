"""Rank source weights and freeze depths for a target task from one pass over its training split.

    tlflax rank --config configs/rank_hymenoptera.py --output workdirs/rank_hymenoptera
    tlflax rank --config configs/folder.py --config.data.path=my_images \\
        --config.rank.sources=efficientnet_lite0.tf_in1k,efficientnet_lite2.tf_in1k \\
        --config.rank.stages=stage3,stage5,pre_logits --output workdirs/rank_mine

Prints a ranked table per score (with the seconds it took) and each score's
pick of source and freeze rule; writes scores.csv, ranking.md, ranking.json
and ranking.png into --output. See `tlflax.inference.ranking`.
"""

import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from tlflax import defaults
from tlflax.cli import app

PROGRAM = "tlflax.cli.rank"


def define_flags(argv: Sequence[str]) -> flags.FlagValues:
  """The command's flags; `argv` names the `--config.KEY` overrides to define."""
  flag_values = app.new_flags()
  config_flags.DEFINE_config_file("config", None, "A get_config() file: config.data is the "
                                  "target, config.rank the candidates.",
                                  flag_values=flag_values, lock_config=True,
                                  sys_argv=[PROGRAM, *argv])
  flags.DEFINE_string("output", None, "Directory for the feature cache, scores.csv, "
                      "ranking.md, ranking.json and ranking.png.", flag_values=flag_values)
  flags.mark_flags_as_required(["config", "output"], flag_values=flag_values)
  return flag_values


def _rank(values) -> None:
  # pylint: disable=import-outside-toplevel
  from tlflax.inference import ranking
  defaults.check_config(values.config, where=values["config"].config_filename.split(":", 1)[0])
  rows = ranking.rank(values.config, values.output)
  print(ranking.markdown_tables(rows))
  print(f"\nWrote {ranking.CSV_FILE}, {ranking.TABLE_FILE}, ranking.json and "
        f"{ranking.PLOT_FILE} to {values.output}")


def main(argv: Sequence[str] | None = None, program: str = PROGRAM) -> int:
  """Runs the command line as `program` (how the user typed it); returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  values = define_flags(argv)
  return app.run(program, values, lambda _: _rank(values), argv, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
