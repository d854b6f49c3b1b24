"""Classify images with a pretrained model as it is: image files, folders, or patterns.

    tlflax classify --model resnet50 --weights resnet50.tv2_in1k cat.jpg dog.png
    tlflax classify --weights ckpt/resnet50 --top_k 3 photos/*.jpg
    tlflax classify --weights workdirs/flowers data/flowers/val

IMAGE_OR_FOLDER arguments are image files, folders (searched recursively for
image files, by the extensions listed below; other files are skipped, counted
and named), or quoted glob patterns ("photos/**/*.jpg"). An image file named
directly gets its top-k guesses printed.

A folder gets a report instead. When its sub-folders are named after the
model's classes (one sub-folder per class, e.g. data/flowers/val/daisy/...,
as a training split is laid out), each image's sub-folder is its class, and
the report gives the top-1 accuracy with its counts, per class, and a
confusion matrix. Sub-folders that name no class of the model are listed and
left out of the accuracy. Every image's guesses (predictions.csv), and the
accuracy (accuracy.csv) and confusion matrix (confusion.csv), are written to
--output_dir (default: ./classify_results; never inside an image folder
unless you say so); the paths written are printed.

--weights is a training run's workdir, a tlflax checkpoint directory
(`tlflax convert`), a pretrained id, or a weight file (with --model and
--source). Preprocessing and class names come with the weights; see
`tlflax.inference.classify`. So do the model options a checkpoint or a run
recorded (e.g. inception_v3's transform_input); `--model_option KEY=VALUE`
sets one for a weight file, or overrides a recorded one.
"""

import dataclasses
import sys
from typing import Sequence

from absl import flags

from tlflax.cli import app

PROGRAM = "tlflax.cli.classify"
DEFAULT_OUTPUT_DIR = "classify_results"
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
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the CSV files go: "
                                  "predictions.csv, and for class folders accuracy.csv and "
                                  f"confusion.csv. Default with a folder: ./{DEFAULT_OUTPUT_DIR}; "
                                  "with image files only, nothing is written unless given.",
                                  flag_values=FLAGS)
_MODEL_OPTION = flags.DEFINE_multi_string(
    "model_option", [], "KEY=VALUE: a setting of the network the weights cannot carry, e.g. "
    "transform_input=False; repeatable; VALUE is a Python literal. A checkpoint's recorded "
    "options apply without it.", flag_values=FLAGS)
flags.mark_flag_as_required("weights", flag_values=FLAGS)


def _classify(arguments: list[str], program: str) -> int:
  # pylint: disable=import-outside-toplevel
  from tlflax.inference import classify, image_folders
  from tlflax.models import registry
  options = registry.merge_model_options(_MODEL_OPTION.value, where="--model_option ")
  if not arguments:
    print(f"{app.error_name(program)}: error: name at least one image file or folder after the "
          "flags (see --help).", file=sys.stderr)
    return app.USAGE
  output_dir = _OUTPUT_DIR.value or DEFAULT_OUTPUT_DIR
  found = image_folders.find_images(arguments, exclude=[output_dir])
  if not _OUTPUT_DIR.value:
    image_folders.check_outside_folders(output_dir, found)
  classifier = classify.load_classifier(_WEIGHTS.value, _MODEL.value, _SOURCE.value, options)
  preprocessing = classifier.preprocessing
  if _IMAGE_SIZE.value:
    preprocessing = preprocessing.with_crop_size(_IMAGE_SIZE.value)
  if _RESIZE_SIZE.value:
    preprocessing = dataclasses.replace(preprocessing, resize_size=_RESIZE_SIZE.value)
  names = (classify.read_class_names(_CLASS_NAMES.value) if _CLASS_NAMES.value
           else classifier.class_names)
  labels = image_folders.folder_labels(found, names)
  # PIL's UnidentifiedImageError (a named file that is no image) is an OSError.
  guesses = classify.classify(classifier.model_name, classifier.variables, found.paths,
                              preprocessing, names, _TOP_K.value,
                              model_options=classifier.model_options)
  print(f"{classifier.model_name} with {classifier.description}")
  for path, folder, image_guesses in zip(found.paths, found.folders, guesses):
    if folder is None:  # named on the command line: its guesses here; a folder's in the CSV
      print(classify.format_guesses(path, image_guesses))
  from_folders = sum(folder is not None for folder in found.folders)
  if from_folders:
    print(f"Classified {from_folders} images found in "
          + ", ".join(dict.fromkeys(f for f in found.folders if f is not None)) + ".")
  skipped = image_folders.describe_skipped(found)
  if skipped:
    print(skipped)
  for note in labels.notes:
    print(note)
  # Labels exist only where folders matched class names, so unnamed classes score nothing.
  score = (image_folders.score(labels.labels, [g[0].index for g in guesses], names)
           if names else None)
  if score is not None:
    print(image_folders.format_score(score))
  if from_folders or _OUTPUT_DIR.value:
    written = image_folders.write_reports(output_dir, found, guesses, labels.labels, names,
                                          score)
    print("Wrote " + ", ".join(written))
  return app.OK


def main(argv: Sequence[str] | None = None, program: str = PROGRAM) -> int:
  """Runs the command line as `program` (how the user typed it); returns the exit status."""
  from tlflax.data.sources import IMAGE_EXTENSIONS  # pylint: disable=import-outside-toplevel
  return app.run(program, FLAGS, lambda arguments: _classify(arguments, program), argv,
                 takes_arguments=True, usage="--weights=WEIGHTS [flags] IMAGE_OR_FOLDER...",
                 description=f"{__doc__}\nImage files in folders: {' '.join(IMAGE_EXTENSIONS)}.")


if __name__ == "__main__":
  sys.exit(main())
