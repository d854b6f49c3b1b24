"""The `tlflax` command (cli/commands.py): its table, names as typed, --help, --print_config.

Two cases start real processes (the console script pip installed, and
`python -m tlflax`); the rest call `tlflax.cli.commands.main(argv, program)`,
which is the whole command line, in this process.
"""

import json
import os
import re
import subprocess
import sys

from tlflax.cli import app, commands
from tlflax.cli import train as train_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = f"--config={REPO}/configs/digits.py"


def run_process(*argv):
  return subprocess.run(list(argv), cwd=REPO, capture_output=True, text=True, timeout=120,
                        check=False)


def test_the_console_script_is_installed_and_lists_the_commands():
  script = os.path.join(os.path.dirname(sys.executable), "tlflax")
  assert os.access(script, os.X_OK), (
      f"{script} is missing: install the package (pip install -e .) to create it")
  result = run_process(script, "--help")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "usage: tlflax <command> [flags]"
  for command in commands.COMMANDS:  # one line each, with what it does
    assert sum(line.split()[:1] == [command.name] for line in lines) == 1, command.name
    assert any(line.strip() == f"{command.name:<8}  {command.summary}" for line in lines)
  assert [c.name for c in commands.COMMANDS] == ["train", "convert", "classify", "features",
                                                  "probe", "rank"]


def test_print_config_through_python_m_tlflax_shows_the_override(tmp_path):
  workdir = tmp_path / "run"
  result = run_process(sys.executable, "-m", "tlflax", "train", DIGITS,
                       "--config.optimizer.learning_rate=0.0123", "--config.batch_size=32",
                       "--print_config", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  config = json.loads(result.stdout)  # nothing but the config on stdout
  assert config["optimizer"]["learning_rate"] == 0.0123  # the override
  assert config["batch_size"] == 32 and config["data"]["source"] == "digits"  # file + override
  assert not workdir.exists()  # printed, nothing trained or written


def test_print_config_needs_no_workdir_and_counts_a_sweeps_points(capsys):
  assert train_cli.main([DIGITS, "--print_config"]) == app.OK
  assert json.loads(capsys.readouterr().out)["model"]["name"] == "cifar_resnet20"
  assert train_cli.main([f"--config={REPO}/configs/depth_sweep.py", "--print_config"]) == app.OK
  captured = capsys.readouterr()
  assert json.loads(captured.out)["freeze"]["rules"]  # the base config
  assert "a sweep of 15 points" in captured.err
  # Without --print_config the workdir is still required, as before.
  assert train_cli.main([DIGITS]) == app.USAGE
  assert "Flag --workdir must have a value other than None" in capsys.readouterr().err


def test_print_config_refuses_what_training_would_refuse(capsys):
  """What --print_config prints is a config that trains: a bad value is the same one line."""
  assert train_cli.main([DIGITS, "--print_config", "--config.num_train_steps=-5"]) == app.FAILED
  captured = capsys.readouterr()
  assert captured.out == ""
  errors = [line for line in captured.err.splitlines() if line.startswith("tlflax.main: error:")]
  assert len(errors) == 1 and "config.num_train_steps=-5" in errors[0], captured.err


def test_an_unknown_command_names_the_nearest_and_is_status_two(capsys):
  assert commands.main(["trian", "--config=x.py"]) == app.USAGE
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.splitlines() == [
      "tlflax: error: unknown command 'trian'; did you mean 'train'? The commands are train, "
      "convert, classify, features, probe, rank."]
  assert commands.main(["linear_probe"]) == app.USAGE  # the module's name finds "probe"
  assert "did you mean 'probe'?" in capsys.readouterr().err
  assert commands.main(["--debug", "train"]) == app.USAGE  # a flag before the command
  assert capsys.readouterr().err.startswith("tlflax: error: name the command before its flags")
  assert commands.main([]) == app.USAGE  # no command: the list, and not a success
  assert capsys.readouterr().out.startswith("usage: tlflax <command> [flags]")


def test_every_command_runs_under_the_name_the_user_typed(capsys):
  modules = {"train": "tlflax.cli.train", "convert": "tlflax.cli.convert",
             "classify": "tlflax.cli.classify", "features": "tlflax.cli.features",
             "probe": "tlflax.cli.linear_probe", "rank": "tlflax.cli.rank"}
  for name, module in modules.items():
    assert commands.main([name, "--help"]) == app.OK, name
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tlflax {name} "), name
    assert f"\n{module}:\n" in out, name  # the right module's flags
  assert commands.main(["classify", "--help"], program="python -m tlflax") == app.OK
  assert capsys.readouterr().out.startswith(
      "usage: python -m tlflax classify --weights=WEIGHTS [flags] IMAGE_OR_FOLDER...\n")
  # Errors name the command without the interpreter; the old module forms keep theirs.
  assert commands.main(["train", DIGITS], program="python -m tlflax") == app.USAGE
  assert capsys.readouterr().err.startswith("tlflax train: error: flag --workdir=None")
  assert train_cli.main([DIGITS]) == app.USAGE
  assert capsys.readouterr().err.startswith("tlflax.main: error: flag --workdir=None")


def test_train_help_explains_the_config_flags(capsys):
  assert commands.main(["train", "--help"]) == app.OK
  out = capsys.readouterr().out
  assert out.startswith("usage: tlflax train --config=FILE --workdir=DIR [--config.KEY=VALUE "
                        "...] [flags]\n")
  for text in ("--config.optimizer.learning_rate=0.01", "tlflax/defaults.py", "configs/",
               "get_config()", "--print_config", "--workdir=DIR"):
    assert text in out, text
  assert "--undefok" not in out  # absl's own flags are left out


def test_every_command_the_documentation_shows_exists():
  """`.venv/bin/tlflax NAME` in the README, docs, configs and scripts names a real command."""
  known = {command.name for command in commands.COMMANDS}
  shown = {}
  for folder, _, names in os.walk(REPO):
    if any(part in folder for part in (".venv", ".git", "workdirs", "site")):
      continue
    for name in names:
      if name.endswith((".py", ".md")):
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
          for used in re.findall(r"bin/tlflax ([a-z_][a-z_-]*)", f.read()):
            shown.setdefault(used, path)
  assert "train" in shown  # the search finds the README's main job
  unknown = {name: path for name, path in shown.items() if name not in known}
  assert not unknown, f"commands shown that do not exist: {unknown}"
