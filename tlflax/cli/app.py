"""What every command line shares: its flags, one logging set-up, and the error boundary.

A command defines its flags on its own `flags.FlagValues` (so commands can be
imported side by side, e.g. in tests) and calls `run`:

    FLAGS = app.new_flags()
    OUTPUT = flags.DEFINE_string("output", None, "...", flag_values=FLAGS)

    def main(argv=None) -> int:
      return app.run("tlflax.cli.convert", FLAGS, _body, argv)

A command with a `--config` file defines its flags per call instead (see
`tlflax.cli.train.define_flags`): ml_collections defines the `--config.KEY`
overrides from the arguments it is given.

A mistake the library can explain (a bad flag, a missing file, weights that
do not fit, a config key that does not exist) is printed as one line,
`<command>: error: <message>`, with exit status 1 (2 for a misused flag);
`--debug` re-raises it with its traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re
import sys
from typing import Callable, Sequence

from absl import flags

# Exit statuses (a training run stopped by a signal: see tlflax.training.preemption).
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130

# What the library raises for a mistake it can explain: the message is meant
# for the user. (WeightsError, CheckpointError, SweepError and
# the data and model errors are ValueErrors; missing or unwritable files are
# OSErrors; a diverged run is a FloatingPointError.)
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)
# What loading a user's config file can raise, beyond those (its own code's errors).
CONFIG_FILE_ERRORS = (SyntaxError, ImportError, NameError, AttributeError, TypeError)


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


def error_line(error: BaseException, argv: Sequence[str] = ()) -> str:
  """The message of an error as one line for the user.

  Multi-line messages (e.g. a list of variables that do not fit) are joined;
  a KeyError's message is unquoted; a missing file, a config file's syntax
  error and a misspelt `--config.` key get a sentence that names them.
  """
  if isinstance(error, FileNotFoundError) and error.filename and error.errno is not None:
    message = f"{error.filename} does not exist"
  elif isinstance(error, SyntaxError) and error.filename:
    message = f"{error.filename}, line {error.lineno}: {error.msg} (a syntax error)"
  elif isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    message = error.args[0]
  else:
    message = str(error) or type(error).__name__
  misspelt = _misspelt_key(message, argv)
  if misspelt:
    return misspelt
  return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _misspelt_key(message: str, argv: Sequence[str]) -> str | None:
  """ml_collections reports an unknown `--config.` key as a quoted KeyError text."""
  try:
    text = ast.literal_eval(message.strip()) if message.strip()[:1] in "'\"" else message
  except (ValueError, SyntaxError):
    return None
  match = re.match(r"^'(?P<key>[^']+)'\s+(?P<hint>Did you mean .*)$", str(text), re.S)
  if not match:
    return None
  flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
               and a.split("=", 1)[0].endswith("." + match["key"])), None)
  where = f" (from {flag})" if flag else ""
  return (f"the config has no key {match['key']!r}{where}; "
          + " ".join(match["hint"].split()).replace("Did you", "did you", 1)
          + " Every key is in tlflax/defaults.py.")


def _check_config_file(argument: str) -> None:
  """Raises what is wrong with a `--config` file (ml_collections would only say it failed)."""
  path = argument.split(":", 1)[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(2, "No such file", path)
  spec = importlib.util.spec_from_file_location("tlflax_checked_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # a syntax error or a failing import surfaces here
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"{path} defines no get_config() function; a config file returns its "
                     "ConfigDict from get_config() (see configs/digits.py).")


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
    0 on success, 1 for a reported error, 2 for a misused flag or a config
    file that does not load, 130 for Ctrl-C outside training; what `body`
    returns otherwise (a training run stopped by a signal: 75 or 130).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
    print(f"usage: python -m {program} [flags]\n{flag_values.get_help()}")
    return OK
  try:
    return _parse_and_call(program, flag_values, body, argv, takes_arguments)
  finally:
    flag_values.unparse_flags()  # a second in-process call parses afresh, after any outcome


def _debug_requested(argv: Sequence[str]) -> bool:
  """Whether `--debug` is on, read from the arguments (for errors before parsing ends)."""
  on = False
  for argument in argv:
    if argument in ("--debug", "--debug=true", "--debug=True", "--debug=1"):
      on = True
    elif argument in ("--nodebug", "--debug=false", "--debug=False", "--debug=0"):
      on = False
  return on


def _parse_and_call(program, flag_values, body, argv, takes_arguments) -> int:
  try:
    remaining = flag_values([program, *argv])[1:]
    if "config" in flag_values and flag_values["config"].present:
      _check_config_file(flag_values["config"].config_filename)
  except flags.Error as e:
    message = _misspelt_key(str(e), argv) or "; ".join(
        line.strip().rstrip(".") for line in str(e).splitlines() if line.strip()) + (
            ". Pass --help to list the flags.")
    print(f"{program}: error: {message}", file=sys.stderr)
    return USAGE
  except (*USER_ERRORS, *CONFIG_FILE_ERRORS) as e:  # e.g. a config file that does not load
    if _debug_requested(argv):
      raise
    print(f"{program}: error: {error_line(e, argv)}", file=sys.stderr)
    return USAGE
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
    print(f"{program}: error: {error_line(e, argv)}", file=sys.stderr)
    return FAILED
  except KeyboardInterrupt:
    # Training turns Ctrl-C into a save (status 130 from the command); this is
    # an interrupt outside a training step, where there is nothing to save.
    if flag_values["debug"].value:
      raise
    print(f"{program}: interrupted (Ctrl-C); nothing was being trained, nothing to save.",
          file=sys.stderr)
    return INTERRUPTED
