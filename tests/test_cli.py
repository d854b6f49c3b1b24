"""What every command line shares (cli/app.py): flags, the error line, exit statuses."""

import os
import subprocess
import sys

import pytest
from absl import flags

from tlflax.cli import app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = "tlflax.tiny"


class Tiny:
  """A command with a required string, an optional integer, and a body that records calls."""

  def __init__(self, raises=None, status=None):
    self.flags = app.new_flags()
    self.name = flags.DEFINE_string("name", None, "Who to greet.", flag_values=self.flags)
    self.times = flags.DEFINE_integer("times", 1, "How often to greet.", flag_values=self.flags)
    flags.mark_flag_as_required("name", flag_values=self.flags)
    self.raises, self.status, self.calls = raises, status, []

  def body(self, arguments):
    self.calls.append((self.name.value, self.times.value, arguments))
    if self.raises is not None:
      raise self.raises
    return self.status

  def __call__(self, *argv, takes_arguments=False):
    return app.run(PROGRAM, self.flags, self.body, list(argv), takes_arguments=takes_arguments)


def error_lines(capsys):
  captured = capsys.readouterr()
  assert captured.out == ""
  return captured.err.splitlines()


def test_success_is_status_zero_or_the_bodys_own(capsys):
  command = Tiny()
  assert command("--name=ada", "--times", "3") == app.OK == 0
  assert command.calls == [("ada", 3, [])]
  assert Tiny(status=3)("--name=ada") == 3
  assert error_lines(capsys) == []


@pytest.mark.parametrize("error, message", [
    (ValueError("weights do not fit"), "weights do not fit"),
    (FileNotFoundError(2, "No such file or directory", "x.pth"), "x.pth does not exist"),
    (PermissionError(13, "Permission denied"), "[Errno 13] Permission denied"),
    (FloatingPointError("loss is nan at step 3"), "loss is nan at step 3"),
    (ValueError(), "ValueError"),  # no message: the type names it
    (ValueError("The weights do not fit:\n  2 missing: a, b\n"),
     "The weights do not fit: 2 missing: a, b"),  # joined into one line
])
def test_a_user_error_is_one_line_and_status_one(error, message, capsys):
  assert Tiny(raises=error)("--name=ada") == app.FAILED == 1
  assert error_lines(capsys) == [f"{PROGRAM}: error: {message}"]


def test_error_line():
  assert app.error_line(KeyError("a key")) == "a key"
  assert app.error_line(FileNotFoundError(2, "No such file", "/x/config.py")) == (
      "/x/config.py does not exist")
  assert app.error_line(KeyError("a", "b")) == "('a', 'b')"
  assert app.error_line(KeyError(3)) == "3"
  assert app.error_line(OSError("disk full")) == "disk full"
  assert app.error_line(RuntimeError()) == "RuntimeError"


def test_debug_reraises_with_the_traceback(capsys):
  error = ValueError("weights do not fit")
  with pytest.raises(ValueError) as raised:
    Tiny(raises=error)("--name=ada", "--debug")
  assert raised.value is error
  assert error_lines(capsys) == []


def test_ctrl_c_in_the_body_is_one_line_and_status_130(capsys):
  assert Tiny(raises=KeyboardInterrupt())("--name=ada") == app.INTERRUPTED == 130
  (line,) = error_lines(capsys)
  assert line.startswith(f"{PROGRAM}: interrupted (Ctrl-C)")
  with pytest.raises(KeyboardInterrupt):
    Tiny(raises=KeyboardInterrupt())("--name=ada", "--debug")


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), KeyError("params")])
def test_a_bug_keeps_its_traceback(bug, capsys):
  # A KeyError from a running command is a library bug, not a user's mistake.
  with pytest.raises(type(bug)):
    Tiny(raises=bug)("--name=ada")
  assert error_lines(capsys) == []


@pytest.mark.parametrize("argv, message", [
    ([], "flag --name=None: Flag --name must have a value other than None"),
    (["--name=ada", "--times=many"],
     "flag --times=many: invalid literal for int() with base 10: 'many'"),
    (["--name=ada", "--colour=red"], "Unknown command line flag 'colour'"),
])
def test_a_misused_or_missing_flag_is_one_line_and_status_two(argv, message, capsys):
  command = Tiny()
  assert command(*argv) == app.USAGE == 2
  assert command.calls == []
  assert error_lines(capsys) == [f"{PROGRAM}: error: {message}. Pass --help to list the flags."]


@pytest.mark.parametrize("help_flag", ["--help", "-h", "--helpfull"])
def test_help_lists_the_flags_and_runs_nothing(help_flag, capsys):
  command = Tiny()
  assert command("--times=x", help_flag) == app.OK  # even beside a bad flag
  assert command.calls == []
  out = capsys.readouterr().out
  assert out.startswith(f"usage: python -m {PROGRAM} [flags]\n")
  for text in ("--name: Who to greet.", "--times: How often to greet.", "(default: '1')",
               "--[no]debug: On an error, show the full traceback."):
    assert text in out, text


def test_a_second_call_in_the_same_process_parses_afresh(capsys):
  command = Tiny()
  assert command("--name=ada", "--times=5") == app.OK
  assert not command.flags.is_parsed()
  assert command("--name=bob") == app.OK
  assert command.calls == [("ada", 5, []), ("bob", 1, [])]
  # After a reported error too.
  command.raises = ValueError("bad")
  assert command("--name=cy", "--times=2") == app.FAILED
  command.raises = None
  assert command("--name=dee") == app.OK
  assert command.calls[-1] == ("dee", 1, [])
  assert command() == app.USAGE  # --name is required again
  capsys.readouterr()


def test_a_call_after_a_usage_error_parses_afresh(capsys):
  command = Tiny()
  assert command("--times=7") == app.USAGE  # --name missing
  assert command("--name=ada") == app.OK
  assert command.calls == [("ada", 1, [])]
  capsys.readouterr()


def test_unexpected_arguments_are_a_usage_error_unless_the_command_takes_them(capsys):
  command = Tiny()
  assert command("--name=ada", "image.jpg") == app.USAGE
  assert command.calls == []
  assert error_lines(capsys) == [
      f"{PROGRAM}: error: unexpected arguments ['image.jpg']. Pass --help to list the flags."]
  assert command("--name=ada", "a.jpg", "b.png", takes_arguments=True) == app.OK
  assert command.calls == [("ada", 1, ["a.jpg", "b.png"])]
  assert error_lines(capsys) == []


def test_each_command_has_its_own_flags():
  one, other = app.new_flags(), app.new_flags()
  flags.DEFINE_string("output", "a", "", flag_values=one)
  flags.DEFINE_integer("output", 2, "", flag_values=other)  # no clash
  assert sorted(one) == ["debug", "output"] and sorted(other) == ["debug", "output"]
  assert one["debug"].default is False


def command_line(*argv):
  return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": REPO}, timeout=120, check=False)


def test_training_without_a_workdir_is_one_line_and_status_two():
  result = command_line("tlflax.main")
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      "tlflax.main: error: flag --workdir=None: Flag --workdir must have a value other than "
      "None. Pass --help to list the flags."]
  assert result.stdout == ""


def test_converting_an_unknown_model_is_one_line_and_status_one():
  result = command_line("tlflax.cli.convert", "--model", "nope", "--input", "x", "--output", "y")
  assert result.returncode == 1, result.stderr
  (line,) = result.stderr.splitlines()
  assert line.startswith("tlflax.cli.convert: error: Unknown model 'nope'. Known models: ")
  assert "cifar_resnet20" in line and "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(REPO, "y"))
