"""What every command line shares: its flags, one logging set-up, and the error boundary.

A command defines its flags on its own `flags.FlagValues` (so commands can be
imported side by side, e.g. in tests) and calls `run`:

    FLAGS = app.new_flags()
    OUTPUT = flags.DEFINE_string("output", None, "...", flag_values=FLAGS)

    def main(argv=None) -> int:
      return app.run("tlflax.cli.features", FLAGS, _body, argv)

A mistake the library can explain (a bad flag, a missing file, weights that
do not fit, a config key that does not exist) is printed as one line,
`<command>: error: <message>`, with exit status 1 (2 for a misused flag);
`--debug` re-raises it with its traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

from absl import flags

# Exit statuses.
OK, FAILED, USAGE = 0, 1, 2

# What the library raises for a mistake it can explain: the message is meant
# for the user. (WeightsError, CheckpointError, SweepError and
# the data and model errors are ValueErrors; missing or unwritable files are
# OSErrors; a diverged run is a FloatingPointError.)
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


def new_flags() -> flags.FlagValues:
  """A command's own flag set, with `--debug` defined."""
  flag_values = flags.FlagValues()
  flags.DEFINE_bool("debug", False, "On an error, show the full traceback.",
                    flag_values=flag_values)
  return flag_values


def setup_logging() -> None:
  """tlflax reports at INFO on stderr; libraries (orbax logs every file it writes) at WARNING."""
  logging.basicConfig(format="%(levelname).1s%(asctime)s %(name)s] %(message)s",
                      datefmt="%m%d %H:%M:%S", level=logging.WARNING, stream=sys.stderr)
  logging.getLogger("tlflax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)


def error_line(error: BaseException) -> str:
  """The message of an error as the user should see it (a KeyError's unquoted)."""
  if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    return error.args[0]
  return str(error) or type(error).__name__


def run(program: str, flag_values: flags.FlagValues, body: Callable[[list[str]], int | None],
        argv: Sequence[str] | None = None, takes_arguments: bool = False) -> int:
  """Parses `argv` into `flag_values`, calls `body`, reports errors; returns the exit status.

  Args:
    program: the command as typed, e.g. "tlflax.cli.convert" (prefixes errors).
    flag_values: from `new_flags`, with the command's flags defined.
    body: called with the arguments left after the flags; returns an exit
      status (None means success).
    argv: the arguments without the program name; `sys.argv[1:]` by default.
    takes_arguments: whether arguments other than flags are allowed (e.g.
      image files); without, they are a usage error.

  Returns:
    0 on success, 1 for a reported error, 2 for a misused flag.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
    print(f"usage: python -m {program} [flags]\n{flag_values.get_help()}")
    return OK
  try:
    remaining = flag_values([program, *argv])[1:]
  except flags.Error as e:
    message = "; ".join(line.rstrip(".") for line in str(e).splitlines() if line.strip())
    print(f"{program}: error: {message}. Pass --help to list the flags.", file=sys.stderr)
    return USAGE
  except USER_ERRORS as e:  # e.g. a config file that does not load
    if "--debug" in argv:
      raise
    print(f"{program}: error: {error_line(e)}", file=sys.stderr)
    return FAILED
  setup_logging()
  try:
    if remaining and not takes_arguments:
      print(f"{program}: error: unexpected arguments {remaining}. Pass --help to list the "
            "flags.", file=sys.stderr)
      return USAGE
    status = body(remaining)
    return OK if status is None else int(status)
  except USER_ERRORS as e:
    if flag_values["debug"].value:
      raise
    print(f"{program}: error: {error_line(e)}", file=sys.stderr)
    return FAILED
  finally:
    flag_values.unparse_flags()  # a second in-process call parses afresh
