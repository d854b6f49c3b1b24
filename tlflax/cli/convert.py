"""Converts pretrained weights once into a tlflax checkpoint.

    python -m tlflax.cli.convert --source torchvision --model resnet50 \\
        --input resnet50-0676ba61.pth --output ckpt/resnet50
    python -m tlflax.cli.convert --model resnet50 --input resnet50.tv2_in1k --output ckpt/r50v2

`--input` is a weight file or a known pretrained id (downloaded and verified
first; `--source` may then be left out). The checkpoint records where the
weights came from and how images must be prepared for them, so
`python -m tlflax.cli.classify --weights ckpt/resnet50 ...` needs nothing else.

A setting of the network that the file cannot carry is given with
`--model_option KEY=VALUE` (repeatable; the value a Python literal) and
recorded in the checkpoint too; e.g. a torchvision inception_v3 trained
without `transform_input`:

    python -m tlflax.cli.convert --source torchvision --model inception_v3 \\
        --input my_inception.pth --output ckpt/mine --model_option transform_input=False

Where a family assumes such a setting (inception_v3's transform_input=True,
torchvision's pretrained setting), the log says so.
"""

import sys
from typing import Sequence

from absl import flags

from tlflax.cli import app

PROGRAM = "tlflax.cli.convert"
FLAGS = app.new_flags()
_SOURCE = flags.DEFINE_enum("source", None, ["torchvision", "timm", "keras", "tlflax"],
                            "Framework of the input file (optional for a pretrained id).",
                            flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", None, "tlflax model name, e.g. resnet50.",
                             flag_values=FLAGS)
_INPUT = flags.DEFINE_string("input", None, "Weight file or pretrained id.", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "Checkpoint directory to write.",
                              flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint in --output.",
                               flag_values=FLAGS)
_MODEL_OPTION = flags.DEFINE_multi_string(
    "model_option", [], "KEY=VALUE: a setting of the network the weight file cannot carry, "
    "e.g. transform_input=False; repeatable; VALUE is a Python literal. Recorded in the "
    "checkpoint.", flag_values=FLAGS)
flags.mark_flags_as_required(["model", "input", "output"], flag_values=FLAGS)


def _convert(_) -> None:
  # pylint: disable=import-outside-toplevel
  from tlflax.models import registry
  from tlflax.weights import convert
  options = registry.merge_model_options(_MODEL_OPTION.value, where="--model_option ")
  print(convert.convert(_MODEL.value, _INPUT.value, _OUTPUT.value, _SOURCE.value,
                        _OVERWRITE.value, options))


def main(argv: Sequence[str] | None = None, program: str = PROGRAM) -> int:
  """Runs the command line as `program` (how the user typed it); returns the exit status."""
  return app.run(program, FLAGS, _convert, argv, description=__doc__)


if __name__ == "__main__":
  sys.exit(main())
