"""Files that are complete or absent, and the cache directory (files.py)."""

import os

import numpy as np
import pytest

from tlflax import files


def listing(directory) -> list[str]:
  return sorted(os.listdir(directory))


# ----------------------------------------------------------------------------
# atomic_file, write_text, write_json, read_json
# ----------------------------------------------------------------------------

def test_the_file_appears_only_when_the_block_ends(tmp_path):
  target = tmp_path / "out.txt"
  with files.atomic_file(target) as f:
    f.write("héllo\n")
    # Meanwhile only a hidden partial file exists, beside the target.
    (partial,) = listing(tmp_path)
    assert partial.startswith(".out.txt.") and partial.endswith(".partial")
    assert not target.exists()
  assert listing(tmp_path) == ["out.txt"]
  assert target.read_bytes() == "héllo\n".encode("utf-8")  # text is UTF-8


def test_binary_mode_and_missing_parent_directories(tmp_path):
  target = tmp_path / "a" / "b" / "data.bin"
  with files.atomic_file(str(target), "wb") as f:
    f.write(b"\x00\xff")
  assert target.read_bytes() == b"\x00\xff"
  assert listing(target.parent) == ["data.bin"]


@pytest.mark.parametrize("error", [ValueError("bad value"), KeyboardInterrupt()])
def test_an_exception_in_the_block_leaves_neither_target_nor_partial_file(tmp_path, error):
  with pytest.raises(type(error)):
    with files.atomic_file(tmp_path / "out.bin", "wb") as f:
      f.write(b"half of it")
      raise error
  assert listing(tmp_path) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_existing_file_is_untouched_when_the_write_fails(tmp_path, error):
  target = tmp_path / "config.json"
  target.write_text("the old content")
  with pytest.raises(type(error)):
    with files.atomic_file(target) as f:
      f.write("the new")
      raise error
  assert target.read_text() == "the old content"
  assert listing(tmp_path) == ["config.json"]


def test_a_successful_write_replaces_an_existing_file(tmp_path):
  target = tmp_path / "out.txt"
  target.write_text("old")
  files.write_text(target, "new")
  assert target.read_text() == "new" and listing(tmp_path) == ["out.txt"]


def test_write_json_writes_indented_json_ending_with_a_newline(tmp_path):
  target = tmp_path / "info.json"
  files.write_json(target, {"b": [1, 2], "a": "x"})
  assert target.read_text() == '{\n "b": [\n  1,\n  2\n ],\n "a": "x"\n}\n'
  files.write_json(target, {"b": 1, "a": 2}, indent=None, sort_keys=True)
  assert target.read_text() == '{"a": 2, "b": 1}\n'
  value = {"name": "run", "steps": [1, 2, 3], "nested": {"ok": True, "none": None}, "x": 0.25}
  files.write_json(str(target), value)
  assert files.read_json(target) == value


def test_a_value_json_cannot_hold_writes_nothing(tmp_path):
  target = tmp_path / "info.json"
  target.write_text('{"old": 1}\n')
  with pytest.raises(TypeError):
    files.write_json(target, {"array": np.zeros(3)})
  assert files.read_json(target) == {"old": 1}
  assert listing(tmp_path) == ["info.json"]


@pytest.fixture
def umask():
  """Sets the process umask for a test (`umask(0o027)`), restoring the old one after."""
  old = os.umask(0o022)
  os.umask(old)
  yield os.umask
  os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_files_get_the_permissions_a_plain_open_gives(tmp_path, umask, mask):
  umask(mask)
  with open(tmp_path / "plain.txt", "w") as f:
    f.write("by hand")
  files.write_text(tmp_path / "atomic.txt", "atomic")
  with files.atomic_file(tmp_path / "atomic.bin", "wb") as f:
    f.write(b"\x00")
  expected = 0o666 & ~mask  # 0644 under the usual umask 022, not mkstemp's 0600
  for name in ("plain.txt", "atomic.txt", "atomic.bin"):
    assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
  # A replaced file gets the same.
  files.write_json(tmp_path / "atomic.txt", {"again": True})
  assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == expected


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_directories_get_the_permissions_a_plain_mkdir_gives(tmp_path, umask, mask):
  umask(mask)
  with files.atomic_directory(tmp_path / "entry") as staging:
    with open(os.path.join(staging, "x"), "w") as f:
      f.write("x")
  assert (tmp_path / "entry").stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700


def test_text_newline_is_passed_on(tmp_path):
  with files.atomic_file(tmp_path / "t.csv", newline="") as f:
    f.write("a,b\r\n")
  assert (tmp_path / "t.csv").read_bytes() == b"a,b\r\n"


# ----------------------------------------------------------------------------
# atomic_directory
# ----------------------------------------------------------------------------

def test_the_directory_appears_only_when_the_block_ends(tmp_path):
  target = tmp_path / "entry"
  with files.atomic_directory(target) as staging:
    assert os.path.dirname(staging) == str(tmp_path)
    assert os.path.basename(staging).startswith(".entry.partial-")
    with open(os.path.join(staging, "a.npy"), "w") as f:
      f.write("a")
    assert not target.exists()
  assert listing(tmp_path) == ["entry"]
  assert listing(target) == ["a.npy"] and (target / "a.npy").read_text() == "a"


@pytest.mark.parametrize("error", [RuntimeError("failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("replace", [False, True])
def test_an_exception_in_the_directory_block_leaves_nothing_new(tmp_path, error, replace):
  with pytest.raises(type(error)):
    with files.atomic_directory(tmp_path / "entry", replace=replace) as staging:
      with open(os.path.join(staging, "part"), "w") as f:
        f.write("half")
      raise error
  assert listing(tmp_path) == []
  # An existing directory survives a failed replacement.
  (tmp_path / "entry").mkdir()
  (tmp_path / "entry" / "old").write_text("old")
  with pytest.raises(type(error)):
    with files.atomic_directory(tmp_path / "entry", replace=replace) as staging:
      raise error
  assert listing(tmp_path) == ["entry"] and listing(tmp_path / "entry") == ["old"]


def test_without_replace_an_entry_that_appeared_meanwhile_is_kept(tmp_path):
  target = tmp_path / "entry"
  with files.atomic_directory(target) as staging:
    with open(os.path.join(staging, "mine"), "w") as f:
      f.write("mine")
    # Another process finished the same entry first.
    target.mkdir()
    (target / "theirs").write_text("theirs")
  assert listing(tmp_path) == ["entry"]  # the staged copy is dropped
  assert listing(target) == ["theirs"] and (target / "theirs").read_text() == "theirs"


def test_with_replace_the_existing_directory_is_replaced(tmp_path):
  target = tmp_path / "entry"
  target.mkdir()
  (target / "old").write_text("old")
  with files.atomic_directory(str(target), replace=True) as staging:
    with open(os.path.join(staging, "new"), "w") as f:
      f.write("new")
    assert listing(target) == ["old"]  # untouched until the block succeeds
  assert listing(tmp_path) == ["entry"]
  assert listing(target) == ["new"] and (target / "new").read_text() == "new"


def test_a_file_where_the_directory_should_go_is_an_error(tmp_path):
  target = tmp_path / "entry"
  target.write_text("a file")
  with pytest.raises(OSError):
    with files.atomic_directory(target):
      pass
  assert listing(tmp_path) == ["entry"] and target.read_text() == "a file"


def test_missing_parent_directories_are_created(tmp_path):
  target = tmp_path / "a" / "b" / "entry"
  with files.atomic_directory(target) as staging:
    with open(os.path.join(staging, "x"), "w") as f:
      f.write("x")
  assert listing(tmp_path / "a" / "b") == ["entry"] and listing(target) == ["x"]


# ----------------------------------------------------------------------------
# cache_dir
# ----------------------------------------------------------------------------

def test_cache_dir_from_environment_or_home(tmp_path, monkeypatch):
  monkeypatch.setenv(files.CACHE_ENV_VAR, str(tmp_path / "elsewhere"))
  assert files.cache_dir() == str(tmp_path / "elsewhere")
  monkeypatch.delenv(files.CACHE_ENV_VAR)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert files.cache_dir() == str(tmp_path / ".cache" / "tlflax")


def test_cache_dir_parts_tilde_and_an_empty_variable(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv(files.CACHE_ENV_VAR, "~/big_disk")
  assert files.cache_dir("prefix", "abc") == str(tmp_path / "home" / "big_disk" / "prefix" / "abc")
  monkeypatch.setenv(files.CACHE_ENV_VAR, "")  # set but empty: the default
  assert files.cache_dir("prefix") == str(tmp_path / "home" / ".cache" / "tlflax" / "prefix")
  monkeypatch.delenv(files.CACHE_ENV_VAR)
  assert files.cache_dir() == str(tmp_path / "home" / ".cache" / "tlflax")
  assert not (tmp_path / "home").exists()  # naming the directory creates nothing
