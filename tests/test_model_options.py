"""Model options a weight file cannot carry: given where weights are converted or used.

The case of issue 22: a torchvision `inception_v3` trained with
`transform_input=False` (the file looks the same either way). `convert
--model_option transform_input=False` records the option, `classify` on the
checkpoint builds the network with it, a training config sets it with
`config.model.options`, and without it the convert log says what it assumed.
References are torchvision with random weights at 75 px, the smallest input
Inception-v3 takes (see test_inception.py).
"""

import csv
import logging
import os

import numpy as np
import pytest
import torch
import torchvision

from conftest import INFERENCE_TOLERANCE
from test_torchvision_parity import randomize_batchnorm
from tlflax import build, defaults
from tlflax.cli import classify as classify_cli
from tlflax.cli import convert as convert_cli
from tlflax.cli import features as features_cli
from tlflax.cli import train as train_cli
from tlflax.data import images
from tlflax.inference import classify
from tlflax.models import inception, registry
from tlflax.weights import WeightsError, native

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = inception.InceptionV3.min_input_size  # 75
CLASSES = 10
ASSUMED = ("inception_v3: assumed transform_input=True (torchvision's pretrained setting); pass "
           "--model_option transform_input=False for a network trained without it.")


@pytest.fixture(name="user_network", scope="module")
def fixture_user_network(tmp_path_factory):
  """A user's own torchvision inception_v3, trained (here: random) without transform_input."""
  torch.manual_seed(0)
  # init_weights=True: with PyTorch's default initialisation the random
  # network's output hardly depends on its input, which would hide a wrong scaling.
  network = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                            transform_input=False, init_weights=True,
                                            num_classes=CLASSES)
  randomize_batchnorm(network)
  network.eval()
  # Random weights give logits of ~1e8, whose softmax is one-hot whatever the
  # input scaling; a smaller head gives logits of a few units, so the
  # probabilities show a wrongly built network.
  with torch.no_grad():
    logits = network(torch.from_numpy(np.random.RandomState(1).randn(1, 3, SIZE, SIZE)).float())
    scale = float(logits.abs().max()) / 3
    network.fc.weight /= scale
    network.fc.bias /= scale
  directory = tmp_path_factory.mktemp("model_options")
  path = directory / "my_inception.pth"
  torch.save(network.state_dict(), path)
  return network, str(path), directory


@pytest.fixture(name="converted", scope="module")
def fixture_converted(user_network):
  """The user's file converted with --model_option transform_input=False."""
  _, path, directory = user_network
  output = str(directory / "ckpt")
  assert convert_cli.main(["--source", "torchvision", "--model", "inception_v3", "--input",
                           path, "--output", output,
                           "--model_option", "transform_input=False"]) == 0
  return output


def test_convert_records_the_option_and_classify_uses_it(user_network, converted, tmp_path,
                                                          capsys):
  network, _, _ = user_network
  assert native.read_provenance(converted)["model_options"] == {"transform_input": False}
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = tmp_path / "image.png"
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (90, 100, 3), np.uint8)).save(image)
  capsys.readouterr()
  # No --model_option: the checkpoint's recorded option applies.
  assert classify_cli.main(["--weights", converted, "--image_size", str(SIZE), "--top_k",
                            str(CLASSES), "--output_dir", str(tmp_path / "out"),
                            str(image)]) == 0
  assert "model options transform_input=False" in capsys.readouterr().out.splitlines()[0]
  with open(tmp_path / "out" / "predictions.csv", encoding="utf-8") as f:
    row = next(csv.DictReader(f))
  ours = {int(row[f"guess_{k}"].split()[-1]): float(row[f"probability_{k}"])
          for k in range(1, CLASSES + 1)}
  # The reference: the user's torch network on the pixels classify prepared.
  preprocessing = classify.load_classifier(converted).preprocessing.with_crop_size(SIZE)
  pixels = images.preprocess([str(image)], preprocessing)
  with torch.no_grad():
    logits = network(torch.from_numpy(np.asarray(pixels).transpose(0, 3, 1, 2)))
  expected = torch.softmax(logits.double(), -1).numpy()[0]
  # Softmax moves no probability by more than the largest logit difference,
  # which float32 parity bounds by INFERENCE_TOLERANCE x the logits' scale
  # (a few units here); 5e-7 is the CSV's 6-decimal rounding. Building the
  # network with transform_input=True instead moves them by up to 0.06.
  bound = INFERENCE_TOLERANCE * float(logits.abs().max()) + 5e-7
  assert max(abs(ours[i] - expected[i]) for i in range(CLASSES)) < bound
  # The test can tell: the same network built with transform_input=True is far off.
  network.transform_input = True
  try:
    with torch.no_grad():
      wrong = torch.softmax(network(torch.from_numpy(
          np.asarray(pixels).transpose(0, 3, 1, 2))).double(), -1).numpy()[0]
  finally:
    network.transform_input = False
  assert np.max(np.abs(wrong - expected)) > 100 * bound


def test_convert_without_the_option_says_what_it_assumed(user_network, tmp_path, caplog):
  _, path, _ = user_network
  output = str(tmp_path / "assumed")
  with caplog.at_level(logging.WARNING, logger="tlflax.weights.convert"):
    assert convert_cli.main(["--source", "torchvision", "--model", "inception_v3", "--input",
                             path, "--output", output]) == 0
  assert ASSUMED in caplog.messages
  # The assumption is recorded, so a later change of the default cannot change the network.
  assert native.read_provenance(output)["model_options"] == {"transform_input": True}
  assert classify.load_classifier(output).model_options == {"transform_input": True}


def test_config_model_options_reach_the_model(converted):
  config = defaults.base_config()
  config.model.name = "inception_v3"
  config.data.image_size = SIZE
  config.model.options = "transform_input=False, dropout_rate=0.25"
  defaults.check_config(config)
  model = build.make_model(config, num_classes=CLASSES)
  assert (model.transform_input, model.dropout_rate) == (False, 0.25)
  # Fine-tuning the converted checkpoint: the config must build what it was converted for.
  config.init.weights, config.init.source = converted, "tlflax"
  assert build.read_pretrained(config) is not None
  config.model.options = ""
  with pytest.raises(WeightsError, match=r"converted for inception_v3 with transform_input="
                     r"False, but the config builds it with transform_input=True\. Add "):
    build.read_pretrained(config)


def test_unknown_or_unreadable_options_are_one_line(converted, capsys, tmp_path):
  def error(main, *argv):
    assert main(list(argv)) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0].split(": error: ", 1)[1]

  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = str(tmp_path / "x.png")
  Image.new("RGB", (80, 80)).save(image)
  options = ", ".join(registry.option_names("inception_v3"))
  assert error(classify_cli.main, "--weights", converted, "--model_option",
               "transform_inputs=False", image) == (
                   "inception_v3 has no option 'transform_inputs'; did you mean "
                   f"transform_input? Its options: {options}.")
  assert "parent" not in options and "transform_input" in options
  assert error(convert_cli.main, "--source", "torchvision", "--model", "inception_v3",
               "--input", "x.pth", "--output", str(tmp_path / "x"), "--model_option",
               "transform_input") == (
                   "--model_option 'transform_input' is not KEY=VALUE[, KEY=VALUE...] with "
                   "Python literal values (e.g. transform_input=False, dropout_rate=0.2).")
  assert error(classify_cli.main, "--weights", converted, "--model_option",
               "transform_input=false", image) == (
                   "inception_v3's option transform_input takes True or False, not 'false'.")
  digits = f"--config={REPO}/configs/digits.py"
  message = error(train_cli.main, digits, f"--workdir={tmp_path / 'run'}",
                  "--config.model.options=transform_input=False")
  assert message == (f"{REPO}/configs/digits.py: config.model.options: cifar_resnet20 has no "
                     "option 'transform_input'. Its options: "
                     f"{', '.join(registry.option_names('cifar_resnet20'))}.")
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  assert "cifar_resnet20 has no option 'transform_input'" in error(
      features_cli.main, digits, f"--output={tmp_path / 'features'}",
      "--model_option", "transform_input=False")
  assert error(train_cli.main, digits, f"--workdir={tmp_path / 'run2'}",
               "--config.model.options=dtype='bfloat16'").endswith(
                   "config.model.options: dtype is not set here; set config.model.dtype.")
