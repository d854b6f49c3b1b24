"""The `tlflax` command: one name for every command line, `tlflax <command> [flags]`.

    tlflax train --config configs/digits.py --workdir workdirs/digits
    tlflax classify --weights workdirs/digits images/
    tlflax train --help

Installed as a console script (setup.cfg) and also run by `python -m tlflax`.
Each command stays a module of its own with `main(argv, program) -> int`, so
`python -m tlflax.cli.convert` and `python -m tlflax.main` keep working; this
module only picks the module and tells it how the user typed its name. A new
command is one more line in `COMMANDS`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
from typing import Sequence

from tlflax.cli import app


@dataclasses.dataclass(frozen=True)
class Command:
  """A sub-command of `tlflax`: its name, the module that runs it, and one line on what it does."""
  name: str
  module: str
  summary: str


COMMANDS = (
    Command("train", "tlflax.cli.train", "train one run, or every point of a sweep config"),
    Command("convert", "tlflax.cli.convert",
            "weights of another framework -> a tlflax checkpoint"),
    Command("classify", "tlflax.cli.classify",
            "top classes of images and folders; accuracy for class folders"),
    Command("features", "tlflax.cli.features",
            "one stage's outputs for a dataset, written as .npy"),
    Command("probe", "tlflax.cli.linear_probe",
            "a linear probe on those features, its settings chosen by cross-validation"),
    Command("rank", "tlflax.cli.rank",
            "transferability scores: which source and freeze depth, before fine-tuning"),
)
_HELP_FLAGS = ("-h", "--help", "-help", "--helpfull")


def overview(program: str = "tlflax") -> str:
  """What `tlflax --help` prints: the usage line and each command with its one line."""
  width = max(len(command.name) for command in COMMANDS)
  lines = [f"usage: {program} <command> [flags]", "", "commands:"]
  lines += [f"  {command.name:<{width}}  {command.summary}" for command in COMMANDS]
  lines += ["", f"`{program} <command> --help` explains a command and lists its flags."]
  return "\n".join(lines)


def find_command(name: str) -> Command:
  """The command called `name`; a ValueError naming the nearest one otherwise."""
  for command in COMMANDS:
    if command.name == name:
      return command
  names = [command.name for command in COMMANDS]
  # 0.5, not difflib's 0.6: "linear_probe" (the module's name) should find "probe".
  nearest = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
  hint = f"did you mean {nearest[0]!r}? " if nearest else ""
  raise ValueError(f"unknown command {name!r}; {hint}The commands are {', '.join(names)}.")


def main(argv: Sequence[str] | None = None, program: str = "tlflax") -> int:
  """Runs `<program> <command> [flags]`; returns the command's exit status.

  Args:
    argv: the arguments after the program; `sys.argv[1:]` by default.
    program: how the user typed the program: "tlflax" (the console script)
      or "python -m tlflax".

  Returns:
    The command's exit status; 0 for `--help`; 2 when no command or an
    unknown one is given.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in _HELP_FLAGS:
    print(overview(program))
    return app.OK if argv else app.USAGE
  name = app.error_name(program)
  if argv[0].startswith("-"):
    print(f"{name}: error: name the command before its flags, e.g. `{program} train "
          f"{argv[0]}`; `{program} --help` lists the commands.", file=sys.stderr)
    return app.USAGE
  try:
    command = find_command(argv[0])
  except ValueError as e:
    print(f"{name}: error: {e}", file=sys.stderr)
    return app.USAGE
  module = importlib.import_module(command.module)
  return module.main(argv[1:], program=f"{program} {command.name}")


if __name__ == "__main__":
  sys.exit(main())
