"""JAX's persistent compilation cache: a compiled step is kept on disk and reused.

Compiling a training step takes tens of seconds on a CPU (45 of the 78
seconds of an EfficientNet-Lite0 fine-tuning run of the ants/bees study), and
a sweep compiles the same program once per point: ten seeds of one recipe
are ten identical programs, since the seed enters the step as an argument
(`tlflax.steps.make_train_step`). With the cache, the first point compiles
and the others read the program from disk, in this process or any later one.

The cache holds compiled programs keyed by everything that makes them
(the lowered program, the compile options, the JAX and XLA versions and the
device), so a hit runs the same machine code a fresh compile would: results
are unchanged, which is why `compilation_cache.*` is not a setting a finished
run is compared on (`tlflax.training.workdir.NOT_SETTINGS`).

Config keys (`config.compilation_cache`, see `tlflax.defaults`):
  enabled: False turns JAX's cache off for this process.
  directory: "" = `$JAX_COMPILATION_CACHE_DIR` if the user set one, else
    `$TLFLAX_CACHE_DIR/xla` (`~/.cache/tlflax/xla`).
  min_compile_seconds: programs that compile faster are not stored (JAX's
    default, 1 s, keeps the many tiny programs out).

JAX trusts what its cache holds: keep the directory writable by you alone.
"""

from __future__ import annotations

import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from tlflax import files

log = logging.getLogger(__name__)

# The variable JAX itself reads the directory from.
JAX_DIRECTORY_VARIABLE = "JAX_COMPILATION_CACHE_DIR"


def default_directory() -> str:
  """`$TLFLAX_CACHE_DIR/xla` (default `~/.cache/tlflax/xla`)."""
  return files.cache_dir("xla")


def cache_directory(directory: str = "") -> str:
  """Where the cache goes: `directory`, else `$JAX_COMPILATION_CACHE_DIR`, else the default."""
  chosen = directory or os.environ.get(JAX_DIRECTORY_VARIABLE) or default_directory()
  return os.path.abspath(os.path.expanduser(chosen))


def use_persistent_cache(settings) -> str | None:
  """Points JAX's persistent compilation cache at the configured directory.

  Calling it again with the same settings changes nothing; another directory
  takes effect for the programs compiled after the call.

  Args:
    settings: `config.compilation_cache` (enabled, directory,
      min_compile_seconds).

  Returns:
    The cache directory, or None when the cache is off (disabled, or its
    directory cannot be created: that is logged, and the run goes on
    compiling every program, as without a cache).
  """
  if not settings.enabled:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  directory = cache_directory(settings.directory)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    log.warning("The compilation cache %s cannot be created (%s); every step is compiled "
                "anew. Set --config.compilation_cache.directory to a writable folder.",
                directory, e)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(settings.min_compile_seconds))
  if jax.config.jax_compilation_cache_dir != directory:
    if jax.config.jax_compilation_cache_dir is not None:
      compilation_cache.reset_cache()  # JAX opens its cache once; reopen it here
    compilation_cache.set_cache_dir(directory)
    log.info("Compiled programs are cached in %s.", directory)
  return directory
