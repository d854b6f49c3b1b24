"""`python -m tlflax <command> [flags]`: the `tlflax` command without the console script.

See `tlflax.cli.commands`; e.g. `python -m tlflax train --config configs/digits.py
--workdir workdirs/digits`.
"""

import sys

from tlflax.cli import commands

if __name__ == "__main__":
  sys.exit(commands.main(program="python -m tlflax"))
