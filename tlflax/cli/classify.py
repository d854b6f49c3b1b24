"""Classify images with a pretrained model as it is.

    python -m tlflax.cli.classify --model resnet50 --weights resnet50.tv2_in1k cat.jpg dog.png
    python -m tlflax.cli.classify --weights ckpt/resnet50 --top_k 3 photos/*.jpg

See `tlflax.inference.classify` for where preprocessing and class names come from.
"""

import dataclasses
import sys
from typing import Sequence

from absl import flags

from tlflax.cli import app

PROGRAM = "tlflax.cli.classify"
FLAGS = app.new_flags()
_WEIGHTS = flags.DEFINE_string("weights", None, "A training run's workdir, a tlflax checkpoint "
                               "directory, a pretrained id, or a weight file.", flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", None, "tlflax model name (optional for a checkpoint or "
                             "id).", flag_values=FLAGS)
_SOURCE = flags.DEFINE_enum("source", None, ["torchvision", "timm", "keras", "tlflax", "workdir"],
                            "Framework of a weight file (workdir: a training run).",
                            flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Guesses per image.", lower_bound=1,
                              flag_values=FLAGS)
_CLASS_NAMES = flags.DEFINE_string("class_names", None, "File with one class name per line.",
                                   flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Crop size; the resize size keeps its "
                                   "ratio to it.", lower_bound=1, flag_values=FLAGS)
_RESIZE_SIZE = flags.DEFINE_integer("resize_size", None, "Shorter side before the centre crop.",
                                    lower_bound=1, flag_values=FLAGS)
flags.mark_flag_as_required("weights", flag_values=FLAGS)


def _classify(image_paths: list[str]) -> int:
  from tlflax.inference import classify  # pylint: disable=import-outside-toplevel
  if not image_paths:
    print(f"{PROGRAM}: error: name at least one image file after the flags.", file=sys.stderr)
    return app.USAGE
  classifier = classify.load_classifier(_WEIGHTS.value, _MODEL.value, _SOURCE.value)
  preprocessing = classifier.preprocessing
  if _IMAGE_SIZE.value:
    preprocessing = preprocessing.with_crop_size(_IMAGE_SIZE.value)
  if _RESIZE_SIZE.value:
    preprocessing = dataclasses.replace(preprocessing, resize_size=_RESIZE_SIZE.value)
  names = (classify.read_class_names(_CLASS_NAMES.value) if _CLASS_NAMES.value
           else classifier.class_names)
  # PIL's UnidentifiedImageError (a file that is no image) is an OSError.
  guesses = classify.classify(classifier.model_name, classifier.variables, image_paths,
                              preprocessing, names, _TOP_K.value)
  print(f"{classifier.model_name} with {classifier.description}")
  for path, image_guesses in zip(image_paths, guesses):
    print(classify.format_guesses(path, image_guesses))
  return app.OK


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  return app.run(PROGRAM, FLAGS, _classify, argv, takes_arguments=True)


if __name__ == "__main__":
  sys.exit(main())
