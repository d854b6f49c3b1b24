"""The persistent compilation cache: a sweep's seeds compile their step once, results unchanged."""

import glob
import logging
import os

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import ml_collections

from tlflax import compilation, training
from tlflax.training import checkpoint
from test_train import SMALL, load_config


@pytest.fixture(name="jax_cache_settings")
def fixture_jax_cache_settings():
  """Puts JAX's cache settings back as they were (the session's own cache) after a test."""
  names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
           "jax_persistent_cache_min_compile_time_secs")
  saved = {name: getattr(jax.config, name) for name in names}
  yield
  jax_cache.reset_cache()
  for name, value in saved.items():
    jax.config.update(name, value)


def settings(**values):
  return ml_collections.ConfigDict({"enabled": True, "directory": "", "min_compile_seconds": 1.0,
                                    **values})


def cached_programs(directory, name):
  return glob.glob(os.path.join(directory, f"jit_{name}-*"))


def test_runs_differing_only_in_seed_compile_their_step_once(tmp_path, jax_cache_settings):
  directory = str(tmp_path / "xla")
  overrides = [*SMALL, "--config.num_train_steps=2", "--config.eval_every_steps=2",
               f"--config.compilation_cache.directory={directory}",
               "--config.compilation_cache.min_compile_seconds=0"]
  for seed in (0, 1):
    training.train_and_evaluate(load_config("digits.py", *overrides, f"--config.seed={seed}"),
                                str(tmp_path / f"seed{seed}"))
  # One program for both seeds: the seed reaches the step as an argument.
  assert len(cached_programs(directory, "train_step")) == 1
  # The program read from the cache is the one a fresh compile makes: the
  # same machine code on the same inputs, so the same numbers, bit for bit.
  training.train_and_evaluate(
      load_config("digits.py", *overrides, "--config.seed=1",
                  "--config.compilation_cache.enabled=False"), str(tmp_path / "uncached"))
  cached, fresh = (checkpoint.restore_params_only(str(tmp_path / name))
                   for name in ("seed1", "uncached"))
  assert jax.tree.all(jax.tree.map(np.array_equal, cached, fresh))
  seed0 = checkpoint.restore_params_only(str(tmp_path / "seed0"))
  assert not jax.tree.all(jax.tree.map(np.array_equal, seed0, fresh))  # the seed still counts


def test_the_configured_directory_comes_first_then_jax_then_tlflax(tmp_path, monkeypatch):
  monkeypatch.setenv("TLFLAX_CACHE_DIR", str(tmp_path / "tlflax"))
  monkeypatch.delenv(compilation.JAX_DIRECTORY_VARIABLE, raising=False)
  assert compilation.cache_directory() == str(tmp_path / "tlflax" / "xla")
  monkeypatch.setenv(compilation.JAX_DIRECTORY_VARIABLE, str(tmp_path / "jax"))
  assert compilation.cache_directory() == str(tmp_path / "jax")
  assert compilation.cache_directory(str(tmp_path / "mine")) == str(tmp_path / "mine")


def test_the_cache_is_pointed_at_the_directory_and_can_be_turned_off(tmp_path, jax_cache_settings):
  directory = str(tmp_path / "xla")
  assert compilation.use_persistent_cache(settings(directory=directory,
                                                   min_compile_seconds=2.5)) == directory
  assert os.path.isdir(directory)
  assert jax.config.jax_compilation_cache_dir == directory
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5
  assert jax.config.jax_enable_compilation_cache
  assert compilation.use_persistent_cache(settings(enabled=False)) is None
  assert not jax.config.jax_enable_compilation_cache


def test_a_directory_that_cannot_be_made_leaves_the_run_uncached_with_a_warning(
    tmp_path, jax_cache_settings, caplog):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  before = jax.config.jax_compilation_cache_dir
  with caplog.at_level(logging.WARNING, logger="tlflax.compilation"):
    assert compilation.use_persistent_cache(settings(directory=str(blocker / "xla"))) is None
  assert "cannot be created" in caplog.text and "compilation_cache.directory" in caplog.text
  assert jax.config.jax_compilation_cache_dir == before
