"""TensorFlow, imported only for tensorflow-datasets and kept off the accelerators.

tlflax reads datasets through tensorflow-datasets (TFDS), which runs on
TensorFlow; JAX does everything else. Every place in tlflax that needs TFDS
gets it from `import_tfds()`, which first hides every GPU and TPU from
TensorFlow, so TensorFlow never reserves accelerator memory that JAX needs
(by default it takes nearly all of a GPU's memory the first time it runs an
op). Its input work then runs on the CPU, where it belongs.

TensorFlow is an optional dependency (the `tf` extra brings `tensorflow-cpu`),
so that a user's own TensorFlow build (`tensorflow`, `tensorflow[and-cuda]`,
tf-nightly) is used as it is and never replaced.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

INSTALL_HINT = ("tlflax reads datasets through tensorflow-datasets, which needs TensorFlow, "
                "and none is installed: run pip install -e \".[tf]\" in the tlflax checkout "
                "(brings tensorflow-cpu), or install your own TensorFlow build.")


def import_tfds() -> Any:
  """`import tensorflow_datasets`, with TensorFlow on the CPU only.

  Call it instead of importing `tensorflow_datasets` (or `tensorflow`)
  directly: it must run before TensorFlow runs any op. Calling it again is
  cheap and harmless.

  Examples:
    >>> tfds = import_tfds()
    >>> builder = tfds.builder("cifar10", data_dir="/data/tfds")

  Returns:
    The `tensorflow_datasets` module.

  Raises:
    ModuleNotFoundError: no TensorFlow is installed (the message names the
      install command).
  """
  hide_accelerators(import_tensorflow())
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds


def import_tensorflow() -> Any:
  """`import tensorflow`, failing with the install command when there is none."""
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError as error:
    if error.name != "tensorflow":
      raise  # a broken TensorFlow install: its own message says more
    raise ModuleNotFoundError(INSTALL_HINT, name="tensorflow") from error
  return tf


def hide_accelerators(tf: Any) -> None:
  """Leaves TensorFlow only its CPUs: no GPU, TPU or other device of its own.

  Args:
    tf: the `tensorflow` module.
  """
  cpus = tf.config.list_physical_devices("CPU")
  try:
    # A no-op when only the CPUs are visible already, even after TF started.
    tf.config.set_visible_devices(cpus)
  except RuntimeError:
    # TensorFlow already ran with its accelerators visible (e.g. a notebook
    # that used TF before tlflax): its devices can no longer be changed.
    log.warning("TensorFlow started before tlflax could hide the accelerators from it, so it "
                "may hold GPU memory that JAX needs. Import tlflax's data modules before "
                "using TensorFlow, or call tf.config.set_visible_devices([], 'GPU') first.")
