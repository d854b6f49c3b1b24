"""The command: `python -m tlflax.main --config configs/NAME.py --workdir DIR`.

Any config key can be overridden, e.g. `--config.optimizer.learning_rate=0.1`;
the config is locked, so a misspelt key is an error. Everything else lives in
`tlflax.train.train_and_evaluate`, importable from a notebook.
"""

import json
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A get_config() file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # tlflax reports at INFO; libraries (orbax logs every file it writes) at WARNING.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("tlflax").setLevel(logging.INFO)
  from tlflax import train  # pylint: disable=import-outside-toplevel
  result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
