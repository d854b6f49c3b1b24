"""What every command line shares: its flags, one logging set-up, and the error boundary.

A command defines its flags on its own `flags.FlagValues` (so commands can be
imported side by side, e.g. in tests) and calls `run`:

    FLAGS = app.new_flags()
    OUTPUT = flags.DEFINE_string("output", None, "...", flag_values=FLAGS)

    def main(argv=None, program="tlflax.cli.convert") -> int:
      return app.run(program, FLAGS, _body, argv, description=__doc__)

`program` is how the user typed the command: the `tlflax` command
(`tlflax.cli.commands`) passes "tlflax convert", so errors and `--help` name
what the user ran.

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
import traceback
from typing import Callable, Sequence

from absl import flags

# Exit statuses (a training run stopped by a signal: see tlflax.training.preemption).
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130

# What the library raises for a mistake it can explain: the message is meant
# for the user. (WeightsError, CheckpointError, SweepError and
# the data and model errors are ValueErrors; missing or unwritable files are
# OSErrors; a diverged run is a FloatingPointError.) A KeyError is not among
# them: raised while a command runs, it is a bug, and its traceback is shown.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
# What parsing a command line with a config file can raise, beyond those: a
# syntax error, and ml_collections' AttributeError or KeyError for a misspelt
# --config.KEY. Whatever the config file's own code raises (a NameError or
# RuntimeError in get_config()) becomes a ConfigFileError that names the file
# and the line.
CONFIG_FILE_ERRORS = (SyntaxError, ImportError, NameError, AttributeError, TypeError, KeyError)


class ConfigFileError(ValueError):
  """A `--config` file whose own code raised: names its file, line and exception.

  Attributes:
    raised: the exception the file's code raised.
  """

  def __init__(self, message: str, raised: BaseException):
    super().__init__(message)
    self.raised = raised


def new_flags() -> flags.FlagValues:
  """A command's own flag set, with `--debug` defined."""
  flag_values = flags.FlagValues()
  flags.DEFINE_bool("debug", False, "On an error, show the full traceback.",
                    flag_values=flag_values)
  return flag_values


LOG_FORMAT = "%(levelname).1s%(asctime)s %(name)s] %(message)s"
LOG_DATE_FORMAT = "%m%d %H:%M:%S"


def setup_logging() -> None:
  """tlflax reports at INFO on stderr; libraries (orbax logs every file it writes) at WARNING."""
  formatter = logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT)
  # absl's first log call (orbax logs on import) installs Python's bare
  # default handler ("INFO:name:message"); give it tlflax's format. Handlers
  # of other kinds (a test runner's, a user's) are left as they are.
  for handler in logging.getLogger().handlers:
    if (type(handler) is logging.StreamHandler  # pylint: disable=unidiomatic-typecheck
        and getattr(handler.formatter, "_fmt", None) == logging.BASIC_FORMAT):
      handler.setFormatter(formatter)
  logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, level=logging.WARNING,
                      stream=sys.stderr)
  logging.getLogger("tlflax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)


def error_line(error: BaseException, argv: Sequence[str] = ()) -> str:
  """The message of an error as one line for the user.

  Multi-line messages (e.g. a list of variables that do not fit) are joined;
  a KeyError's message is unquoted; a missing file, a config file's syntax
  error and a misspelt `--config.` key get a sentence that names them (an
  exception a config file's code raised is a ConfigFileError that does).
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
  try:  # str(KeyError(text)) is the text's repr; KeyError.args[0] is the text itself
    text = ast.literal_eval(message.strip()) if message.strip()[:1] in "'\"" else message
  except (ValueError, SyntaxError):
    text = message
  match = re.match(r"^'(?P<key>[^']+)'\s+(?P<hint>Did you mean .*)$", str(text), re.S)
  if not match:
    return None
  # The flag that names the key, as its last part or as a parent of it.
  flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
               and f"{a.split('=', 1)[0]}.".count(f".{match['key']}.")), None)
  where = f" (from {flag})" if flag else ""
  return (f"the config has no key {match['key']!r}{where}; "
          + " ".join(match["hint"].split()).replace("Did you", "did you", 1)
          + " Every key is in tlflax/defaults.py.")


def _check_config_file(argument: str) -> None:
  """Raises what is wrong with a `--config` file (ml_collections would only say it failed).

  The file is imported and its `get_config()` called, as ml_collections
  does (which keeps an OSError from get_config() until the config is used).

  Raises:
    FileNotFoundError: no such file.
    SyntaxError: the file does not compile (its file and line are named).
    ConfigFileError: the file's code raised: names the line and the exception.
    ValueError: the file defines no get_config().
  """
  path, colon, config_argument = argument.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(2, "No such file", path)
  spec = importlib.util.spec_from_file_location("tlflax_checked_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError:
    raise  # error_line names its file and line
  except Exception as e:  # pylint: disable=broad-except
    _raise_from_config_file(e, path)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"{path} defines no get_config() function; a config file returns its "
                     "ConfigDict from get_config() (see configs/digits.py).")
  try:
    module.get_config(*([config_argument] if colon else []))
  except Exception as e:  # pylint: disable=broad-except
    _raise_from_config_file(e, path)


def _raise_from_config_file(error: Exception, path: str | None) -> None:
  """Raises `error` as a ConfigFileError if the config file raised it, else as it is."""
  raised = config_file_error(error, path) if path else None
  if raised is None:
    raise error
  # With --debug, the traceback of what the file raised (not ml_collections' re-raise).
  raise raised from raised.raised


def config_file_error(error: BaseException, path: str) -> ConfigFileError | None:
  """`error` as a ConfigFileError if the config file `path` raised it, else None.

  The file raised it if a frame of the file is in its traceback, or in that
  of an exception it led to (ml_collections re-raises some as its own). The
  line named is the file's innermost frame: where the file's code raised, or
  where it called the code that did.

  Example:
    >>> config_file_error(error, "my_config.py")
    ConfigFileError("my_config.py, line 7: NameError: name 'bach_size' is not defined "
                    "(raised inside get_config())")
  """
  target = os.path.realpath(path)
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if os.path.realpath(frame.filename) == target]
    if frames:
      frame = frames[-1]
      during = ("while the file was imported" if frame.name == "<module>"
                else f"inside {frame.name}()")
      message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
      return ConfigFileError(f"{path}, line {frame.lineno}: {type(error).__name__}: "
                             f"{message or '(no message)'} (raised {during})", error)
    error = error.__cause__ or error.__context__
  return None


def _config_argument(argv: Sequence[str]) -> str | None:
  """The `--config` file named in `argv` (without its `:ARG`), if any."""
  for i, argument in enumerate(argv):
    name, equals, value = argument.partition("=")
    if name in ("--config", "-config"):
      value = value if equals else (argv[i + 1] if i + 1 < len(argv) else "")
      return value.split(":", 1)[0] or None
  return None


def _parse(program: str, flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """Parses `argv` and checks a `--config` file; returns the arguments left."""
  try:
    remaining = flag_values([program, *argv])[1:]
  except Exception as e:  # pylint: disable=broad-except
    # ml_collections calls get_config() while parsing: what the file's own
    # code raised is reported with its file and line.
    _raise_from_config_file(e, _config_argument(argv))
  if "config" in flag_values and flag_values["config"].present:
    _check_config_file(flag_values["config"].config_filename)
  return remaining


def run(program: str, flag_values: flags.FlagValues, body: Callable[[list[str]], int | None],
        argv: Sequence[str] | None = None, takes_arguments: bool = False,
        usage: str = "[flags]", description: str | None = None) -> int:
  """Parses `argv` into `flag_values`, calls `body`, reports errors; returns the exit status.

  Args:
    program: the command as the user typed it: "tlflax train" (the console
      command), "python -m tlflax train", or a module name such as
      "tlflax.cli.convert" (typed as `python -m tlflax.cli.convert`). Errors
      start with it, less any "python -m " (`tlflax train: error: ...`); the
      `--help` usage line shows it whole.
    flag_values: from `new_flags`, with the command's flags defined.
    body: called with the arguments left after the flags; returns an exit
      status (None means success).
    argv: the arguments without the program name; `sys.argv[1:]` by default.
    takes_arguments: whether arguments other than flags are allowed (e.g.
      image files); without, they are a usage error.
    usage: what follows the command on `--help`'s usage line, e.g.
      "--weights=W [flags] IMAGE_OR_FOLDER...".
    description: printed by `--help` between the usage line and the flags
      (a command passes its module docstring).

  Returns:
    0 on success, 1 for a reported error, 2 for a misused flag or a config
    file that does not load, 130 for Ctrl-C outside training; what `body`
    returns otherwise (a training run stopped by a signal: 75 or 130).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
    print(help_text(program, flag_values, usage, description))
    return OK
  try:
    return _parse_and_call(error_name(program), flag_values, body, argv, takes_arguments)
  finally:
    flag_values.unparse_flags()  # a second in-process call parses afresh, after any outcome


def typed_command(program: str) -> str:
  """The command as typed: a module name is run as `python -m <module>`, others are as given."""
  return program if " " in program else f"python -m {program}"


def error_name(program: str) -> str:
  """What a command's errors start with: "tlflax train", "tlflax.main" (no "python -m ")."""
  return program.removeprefix("python -m ")


def help_text(program: str, flag_values: flags.FlagValues, usage: str = "[flags]",
              description: str | None = None) -> str:
  """`--help`: the usage line, the command's description, then its flags (absl's own left out)."""
  parts = [f"usage: {typed_command(program)} {usage}"]
  if description and description.strip():
    parts.append(description.strip())
  parts.append("flags:\n" + flag_values.get_help(include_special_flags=False).strip("\n"))
  return "\n\n".join(parts)


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
    remaining = _parse(program, flag_values, argv)
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
