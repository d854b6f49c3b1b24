"""Files that are complete or absent, and where tlflax keeps its caches.

Every file tlflax writes for later reading (configs, results, checkpoints of
converted weights, cached features, downloads) goes through one of these, so
a run killed mid-write never leaves a half-written file that a later run
would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import Any, Iterator

CACHE_ENV_VAR = "TLFLAX_CACHE_DIR"
# What a plain open() or mkdir asks for; the kernel takes the umask off (and a
# directory's default ACL applies), so colleagues can read what a run writes
# wherever they could read a file the user wrote by hand. tempfile's mkstemp
# and mkdtemp would ask for 0600 and 0700.
FILE_MODE, DIRECTORY_MODE = 0o666, 0o777


def cache_dir(*parts: str) -> str:
  """`$TLFLAX_CACHE_DIR/<parts>`, else `~/.cache/tlflax/<parts>`.

  Examples:
    >>> cache_dir("prefix")
    '/home/me/.cache/tlflax/prefix'
  """
  base = os.environ.get(CACHE_ENV_VAR) or os.path.join("~", ".cache", "tlflax")
  return os.path.join(os.path.expanduser(base), *parts)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", newline: str | None = None
                ) -> Iterator[Any]:
  """Opens a temporary file beside `path`; it becomes `path` only if the block succeeds.

  The file gets the permissions a plain `open(path, "w")` would give it
  (0666 less the umask, usually 0644).

  Args:
    path: the file to write.
    mode: "w" (text, UTF-8) or "wb".
    newline: for text, as `open`'s (e.g. "" for the csv module).

  Yields:
    The open temporary file.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, partial = _new_partial_file(directory, os.path.basename(path))
  try:
    text_options = {} if "b" in mode else {"encoding": "utf-8", "newline": newline}
    with os.fdopen(handle, mode, **text_options) as f:
      yield f
    os.replace(partial, path)
  except BaseException:  # KeyboardInterrupt included: never leave the partial file
    if os.path.exists(partial):
      os.remove(partial)
    raise


def _new_partial_file(directory: str, name: str) -> tuple[int, str]:
  """Creates `directory/.<name>.<random>.partial` exclusively; returns (descriptor, path)."""
  while True:
    partial = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.partial")
    try:
      return os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     FILE_MODE), partial
    except FileExistsError:  # another writer drew the same name: draw again
      continue


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically."""
  with atomic_file(path) as f:
    f.write(text)


def write_json(path: str | os.PathLike, value: Any, indent: int = 1, **dump_options) -> None:
  """Writes `value` as JSON to `path` atomically (ending with a newline)."""
  write_text(path, json.dumps(value, indent=indent, **dump_options) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in `path`."""
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, replace: bool = False) -> Iterator[str]:
  """A staging directory beside `directory` that becomes it if the block succeeds.

  The directory gets the permissions a plain `os.mkdir` would give it (0777
  less the umask, usually 0755).

  Args:
    directory: the directory to create.
    replace: remove an existing `directory` first. Without it, a directory
      that appeared meanwhile (another process wrote the same entry) is kept
      and the staged copy dropped.

  Yields:
    The staging directory's path, to write into.
  """
  directory = os.path.abspath(os.fspath(directory))
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = _new_staging_directory(parent, os.path.basename(directory))
  try:
    yield staging
    if replace and os.path.exists(directory):
      shutil.rmtree(directory)
    try:
      os.rename(staging, directory)
    except OSError:
      if replace or not os.path.isdir(directory):
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _new_staging_directory(parent: str, name: str) -> str:
  """Creates `parent/.<name>.partial-<random>` (permissions as a plain mkdir gives)."""
  while True:
    staging = os.path.join(parent, f".{name}.partial-{secrets.token_hex(4)}")
    try:
      os.mkdir(staging, DIRECTORY_MODE)
      return staging
    except FileExistsError:
      continue
