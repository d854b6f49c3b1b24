"""Every mistake a careless user makes gets one clear line, the right exit status, and loses nothing.

The commands run as a user runs them: `tlflax.cli.train.main(argv)` is the
whole command line of `python -m tlflax.main` (flag parsing, the error
boundary, the exit status), called in this process to spare a start-up per
case; the cases that need a real process (signals, a killed lock holder, the
status a shell sees) start one.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
# Imported before any test loads TensorFlow (see test_train.py).
import torch
import torchvision
from PIL import Image

from tlflax import models
from tlflax.cli import classify as classify_cli
from tlflax.cli import train as train_cli
from tlflax.training import preemption
from tlflax.training import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = f"--config={REPO}/configs/digits.py"
# A few steps of 16 images (8 simulated devices, 2 images each).
SMALL = ["--config.num_train_steps=2", "--config.batch_size=16", "--config.eval_batch_size=32",
         "--config.log_every_steps=1"]


def run(capsys, *argv) -> tuple[int, list[str]]:
  """The exit status and the lines on stderr that are not logging."""
  status = train_cli.main(list(argv))
  err = capsys.readouterr().err
  return status, [line for line in err.splitlines() if line.startswith("tlflax.")]


def one_error_line(capsys, *argv, status=1) -> str:
  """Runs the command, checks it failed with `status`, returns its single error line."""
  got, lines = run(capsys, *argv)
  assert got == status, lines
  assert len(lines) == 1 and lines[0].startswith("tlflax.main: error: "), lines
  return lines[0][len("tlflax.main: error: "):]


def image_folder(root, classes=("ants", "bees"), splits=("train", "val"), per_class=4):
  for split in splits:
    for index, name in enumerate(classes):
      os.makedirs(root / split / name, exist_ok=True)
      for k in range(per_class):
        pixels = np.full((40, 48, 3), 40 * index + 10 * k, np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{k}.png")
  return root


def folder_args(root):
  return ["--config.data.source=folder", f"--config.data.path={root}",
          "--config.data.train_split=train", "--config.data.eval_split=val",
          "--config.data.augment=none", "--config.batch_size=8", "--config.eval_batch_size=8"]


# -- Configs and flags ----------------------------------------------------------


def test_a_misspelt_key_names_the_key_and_the_right_one(capsys, tmp_path):
  line = one_error_line(capsys, DIGITS, f"--workdir={tmp_path}/run",
                        "--config.optimizer.learning_rat=0.1", status=2)
  assert line.startswith("the config has no key 'learning_rat' (from "
                         "--config.optimizer.learning_rat); did you mean \"learning_rate\"")
  # A misspelt parent: ml_collections raises a KeyError, not an AttributeError.
  line = one_error_line(capsys, DIGITS, f"--workdir={tmp_path}/run",
                        "--config.optimzer.learning_rate=0.1", status=2)
  assert line.startswith("the config has no key 'optimzer' (from "
                         "--config.optimzer.learning_rate); did you mean \"optimizer\"")
  assert not (tmp_path / "run").exists()


def test_config_files_that_do_not_load(capsys, tmp_path):
  assert one_error_line(capsys, f"--config={tmp_path}/nope.py", f"--workdir={tmp_path}/run",
                        status=2) == f"{tmp_path}/nope.py does not exist"
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  assert one_error_line(capsys, f"--config={broken}", f"--workdir={tmp_path}/run",
                        status=2).startswith(f"{broken}, line 1: ")
  assert one_error_line(capsys, DIGITS, status=2) == (
      "flag --workdir=None: Flag --workdir must have a value other than None. Pass --help to "
      "list the flags.")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["--config.model.name=resnet19"], "Unknown model 'resnet19'. Known models: "),
    (["--config.data.source=csv"], "Unknown config.data.source 'csv'; use one of "),
    (["--config.batch_size=-4"], "config.batch_size=-4: batch_size is the images of one "
                                 "training step, over all devices; use a whole number >= 1."),
    (["--config.batch_size=12"], "batch_size=12 does not divide over 8 devices; use a multiple "
                                 "of 8."),
    (["--config.batch_size=8000"], "The train split has 721 examples, fewer than one global "
                                   "batch of 8000."),
    (["--config.freeze.rules=frozen_all"], "config.freeze.rules: Unknown freeze spec "
                                           "'frozen_all'. Use 'none', 'linear_probe', "),
    (["--config.freeze.rules=depth:99"], "config.freeze.rules: Freeze spec 'depth:99': Freeze "
                                         "depth 99 out of range: this model has stages "),
    (["--config.freeze.rules=depth:abc"], "config.freeze.rules: Freeze spec 'depth:abc': the "
                                          "depth must be a whole number of stages, e.g. "
                                          "'depth:2' (0..3 for this model)"),
    (["--config.init.weights=/nonexistent/w.pth", "--config.init.source=torchvision"],
     "Weight file '/nonexistent/w.pth' does not exist and is no known pretrained id."),
])
def test_a_refused_start_is_one_line_and_writes_nothing(overrides, message, capsys, tmp_path):
  assert one_error_line(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run",
                        *overrides).startswith(message)
  assert not (tmp_path / "run").exists()


def test_weights_that_are_not_weights_or_of_another_network(capsys, tmp_path):
  text = tmp_path / "notes.pth"
  text.write_text("not weights")
  line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run",
                        f"--config.init.weights={text}", "--config.init.source=torchvision")
  assert line.startswith(f"'{text}' is not a PyTorch weight file: it is neither a zip archive "
                         "nor a pickle")
  other = tmp_path / "resnet18.pth"
  torch.save(torchvision.models.resnet18().state_dict(), other)
  line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run",
                        f"--config.init.weights={other}", "--config.init.source=torchvision")
  assert line.startswith("The weights do not fit model 'cifar_resnet20' (from torchvision file")
  assert not (tmp_path / "run").exists()


def test_unusable_workdirs(capsys, tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  assert one_error_line(capsys, DIGITS, *SMALL, f"--workdir={a_file}") == (
      f"{a_file} is a file, not a directory; choose another workdir (checkpoints go to "
      "WORKDIR/checkpoints/).")
  # Somewhere nobody may create a directory, not even root.
  unwritable = "/proc/tlflax-workdir" if os.path.isdir("/proc") else None
  if unwritable:
    line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={unwritable}")
    assert line.startswith(f"Cannot write to the workdir {unwritable} (")
    assert line.endswith("); choose a --workdir you can write to.")


def test_freeze_rules_that_decide_nothing_are_refused(tmp_path):
  """A typo, or a rule after ('.*', ...), would otherwise leave everything trainable."""
  from test_train import load_config  # pylint: disable=import-outside-toplevel
  from tlflax import training  # pylint: disable=import-outside-toplevel

  def config_with(rules):
    config = load_config("digits.py", *SMALL)
    config.stages = ({"name": "all", "steps": 2, "freeze": rules, "learning_rate": 0.05},)
    return config

  with pytest.raises(ValueError, match=r"Stage 'all': Freeze rules that decide nothing: rule 0 "
                                       r"\('stage_1/\.\*', 'frozen'\) matches no parameter "
                                       r"\(the nearest names: stage1"):
    training.train_and_evaluate(config_with([("stage_1/.*", "frozen"), (".*", "trainable")]),
                                str(tmp_path / "run"))
  with pytest.raises(ValueError, match=r"rule 1 \('stem/\.\*', 'frozen'\) comes after '\.\*'"):
    training.train_and_evaluate(config_with([(".*", "trainable"), ("stem/.*", "frozen")]),
                                str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_head_without_classes_is_refused():
  with pytest.raises(ValueError, match=r"num_classes=0: a head needs at least one class"):
    models.get_model("resnet18", num_classes=0)


# -- Image folders --------------------------------------------------------------


def test_image_folders_with_empty_or_mismatched_classes(capsys, tmp_path):
  root = image_folder(tmp_path / "images")
  os.makedirs(root / "train" / "wasps")
  os.makedirs(root / "val" / "wasps")
  line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run", *folder_args(root))
  assert line.startswith("1 class folder holds no image files (.jpg, ")
  assert line.endswith(f"): {root}/train/wasps. Add images or remove the folder (from every "
                       "split).")
  os.rmdir(root / "val" / "wasps")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "wasps" / "0.png")
  line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run", *folder_args(root))
  assert line == (f"The class folders of {root}/val differ from those of {root}/train: missing "
                  f"from {root}/val: wasps. Every split needs the same class sub-folders.")
  line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run",
                        *folder_args(tmp_path / "nowhere"))
  assert line.startswith(f"The image folder {tmp_path}/nowhere does not exist: set "
                         "--config.data.path")
  assert not (tmp_path / "run").exists()


def test_the_folder_config_outside_the_checkout_names_the_key_to_set(capsys, tmp_path):
  copy = tmp_path / "configs" / "folder.py"
  os.makedirs(copy.parent)
  copy.write_text(open(f"{REPO}/configs/folder.py", encoding="utf-8").read())
  line = one_error_line(capsys, f"--config={copy}", f"--workdir={tmp_path}/run")
  assert line.startswith(f"The image folder {tmp_path.parent}/shared/data/hymenoptera does not "
                         "exist: set --config.data.path to a folder")
  (tmp_path / "empty").mkdir()
  line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run",
                        *folder_args(tmp_path / "empty"))
  assert line.startswith(f"Image folder split {tmp_path}/empty/train does not exist ")
  assert not (tmp_path / "run").exists()


def test_files_that_are_no_images_are_named_before_training(capsys, tmp_path):
  root = image_folder(tmp_path / "images")
  (root / "train" / "bees" / "notes.jpg").write_text("shopping list")
  line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run", *folder_args(root))
  assert line.startswith(f"1 of 9 files are not readable images: {root}/train/bees/notes.jpg: ")
  assert line.endswith("set config.data.skip_bad_files=True to train without them.")
  status, _ = run(capsys, DIGITS, *SMALL, f"--workdir={tmp_path}/run", *folder_args(root),
                  "--config.data.skip_bad_files=True")
  assert status == 0


def test_a_truncated_image_is_named_when_decoded(tmp_path):
  from tlflax.data import images  # pylint: disable=import-outside-toplevel
  path = tmp_path / "cut.jpg"
  pixels = np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)
  Image.fromarray(pixels).save(path, quality=90)
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  assert images.check_header(path) is None  # the header is intact
  with pytest.raises(images.ImageError, match=f"Cannot read {path} as an image: "):
    images.read_rgb(path)


# -- Runs that go wrong --------------------------------------------------------


def test_a_diverging_run_keeps_only_good_checkpoints_and_says_how_to_go_on(capsys, tmp_path):
  workdir = tmp_path / "run"
  # Warm-up from zero: step 1 trains at rate 0 (a good checkpoint), step 2 at 5e8 diverges.
  diverging = [DIGITS, "--config.num_train_steps=4", "--config.batch_size=16",
               "--config.eval_batch_size=32", f"--workdir={workdir}",
               "--config.checkpoint_every_steps=1", "--config.eval_every_steps=1",
               "--config.optimizer.warmup_steps=2", "--config.optimizer.learning_rate=1e9"]
  line = one_error_line(capsys, *diverging)
  assert "at step 2; stopping without saving it. The last good checkpoint, step 1, eval loss" in (
      line), line
  assert line.endswith("and it resumes from step 1 with the new settings.")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]
  # The way the message gives works: the same command with a sane learning rate.
  status, lines = run(capsys, *diverging[:-1], "--config.optimizer.learning_rate=0.05")
  assert status == 0, lines
  assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "4"
  assert (workdir / "config.resumed_at_step_1.json").exists()


def test_a_refused_resume_writes_nothing(capsys, tmp_path):
  workdir = tmp_path / "run"
  assert run(capsys, DIGITS, *SMALL, f"--workdir={workdir}")[0] == 0
  before = sorted(os.listdir(workdir))
  line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={workdir}",
                        "--config.model.name=cifar_resnet32")
  # Finished: another model is another setting, refused before anything is built.
  assert line.startswith(f"{workdir} holds a finished run (step 2 of 2) with other settings: "
                         "model.name: 'cifar_resnet20' -> 'cifar_resnet32'"), line
  assert sorted(os.listdir(workdir)) == before  # no config.resumed_at_step_2.json
  # A run stopped mid-way may resume with changed settings, but not into a
  # state of another shape.
  stopped = tmp_path / "stopped"
  assert run(capsys, DIGITS, *SMALL, f"--workdir={stopped}",
             "--config.checkpoint_every_steps=1")[0] == 0
  shutil.rmtree(stopped / "checkpoints" / "2")  # as if stopped after step 1
  before = sorted(os.listdir(stopped))
  line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={stopped}",
                        "--config.checkpoint_every_steps=1", "--config.model.name=cifar_resnet32")
  assert line.startswith(f"The checkpoint of step 1 in {stopped}/checkpoints does not fit the "
                         "state this run builds:"), line
  assert sorted(os.listdir(stopped)) == before


def test_a_workdir_belongs_to_one_run_at_a_time(capsys, tmp_path):
  workdir = tmp_path / "run"
  with workdir_lib.lock(workdir):
    line = one_error_line(capsys, DIGITS, *SMALL, f"--workdir={workdir}")
  assert line.startswith(f"{workdir} is in use by another run (pid {os.getpid()} on ")
  assert line.endswith("Wait for it to finish (or stop it), or use another --workdir.")
  # A holder killed with SIGKILL leaves nothing stuck: the lock dies with it.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom tlflax.training import workdir\n"
       f"with workdir.lock({str(workdir)!r}):\n  print('held', flush=True)\n  time.sleep(600)"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert "is in use by another run" in one_error_line(capsys, DIGITS, *SMALL,
                                                        f"--workdir={workdir}")
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()
  assert run(capsys, DIGITS, *SMALL, f"--workdir={workdir}")[0] == 0


def start_training(workdir, log, *overrides):
  command = [sys.executable, "-m", "tlflax.main", DIGITS, f"--workdir={workdir}",
             "--config.batch_size=16", "--config.eval_batch_size=32", "--config.num_epochs=50",
             "--config.log_every_steps=1", *overrides]
  # stderr to a file: a full pipe would stall the run while the test waits.
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)


def wait_for_steps(process, workdir, timeout=300):
  """Waits until the run has logged a training step (so it is inside the loop)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    path = workdir / "metrics.jsonl"
    if path.exists() and path.read_text().count('"train"') >= 2:
      return
    assert process.poll() is None, f"the run ended early ({process.returncode})"
    time.sleep(0.2)
  raise AssertionError("no training step logged in time")


@pytest.mark.parametrize("sent, status", [(signal.SIGINT, 130), (signal.SIGTERM, 75)])
def test_ctrl_c_and_preemption_save_and_exit_with_their_own_status(sent, status, tmp_path):
  workdir = tmp_path / "run"
  with open(tmp_path / "stderr.txt", "w", encoding="utf-8") as log:
    process = start_training(workdir, log)
    try:
      wait_for_steps(process, workdir)
      process.send_signal(sent)
      process.wait(timeout=300)
    finally:
      process.kill()
  err = (tmp_path / "stderr.txt").read_text()
  assert process.returncode == status, err[-2000:]
  lines = [line for line in err.splitlines() if line.startswith("tlflax.main:")]
  name = signal.Signals(sent).name
  assert len(lines) == 1 and lines[0].startswith(f"tlflax.main: stopped by {name} at step ")
  assert lines[0].endswith("after saving a checkpoint; run the same command again to resume "
                           f"(exit status {status}).")
  assert "Traceback" not in err
  saved = os.listdir(workdir / "checkpoints")
  assert saved and all(name.isdigit() for name in saved)
  assert status == preemption.exit_status(name)


# -- classify --------------------------------------------------------------------


def test_classify_refuses_a_decompression_bomb_in_one_line(capsys, tmp_path):
  bomb = tmp_path / "huge.png"
  Image.new("1", (15000, 15000)).save(bomb)  # 225 megapixels, a few kilobytes
  weights = tmp_path / "r18.pth"
  torch.save(torchvision.models.resnet18().state_dict(), weights)
  assert classify_cli.main(["--model", "resnet18", "--source", "torchvision", "--weights",
                            str(weights), str(bomb)]) == 1
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"tlflax.cli.classify: error: {bomb} is too large to decode safely (")
  assert lines[0].endswith("downscale it first.")


def test_classify_with_a_model_you_trained(capsys, tmp_path):
  root = image_folder(tmp_path / "images")
  workdir = tmp_path / "run"
  assert run(capsys, DIGITS, *SMALL, f"--workdir={workdir}", *folder_args(root),
             "--config.data.image_size=32")[0] == 0
  assert workdir_lib.read_class_names(workdir) == ["ants", "bees"]
  image = root / "val" / "bees" / "0.png"
  assert classify_cli.main(["--weights", str(workdir), "--top_k", "2", str(image)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == f"cifar_resnet20 with the final weights of the training run {workdir}"
  assert out[1] == str(image) and {line.split()[-1] for line in out[2:]} == {"ants", "bees"}
