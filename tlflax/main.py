"""`python -m tlflax.main`: training, one run or a sweep (see `tlflax.cli.train`).

The entry point the README, the configs and the cluster scripts name; the
command itself lives with the others in `tlflax.cli`.
"""

import sys

from tlflax.cli.train import main

if __name__ == "__main__":
  sys.exit(main())
