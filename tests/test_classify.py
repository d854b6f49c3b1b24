"""Image preprocessing (data/images.py) and the classifier as it is (classify.py)."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tlflax import weights
from tlflax.inference import classify, image_folders
from tlflax.data import images
from tlflax.weights import native, registry
from tlflax.weights.merge import WeightsError
from tlflax.cli import classify as classify_cli

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
transforms = torchvision.transforms

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small images keep the model fast; the preprocessing tests use 224 too.
SMALL = images.Preprocessing(crop_size=64, resize_size=73)
FAVOURITE_CLASS = 207  # "golden retriever"


def random_pixels(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(name="image_files", scope="module")
def fixture_image_files(tmp_path_factory):
  """RGB, greyscale, RGBA and palette files of odd sizes."""
  directory = tmp_path_factory.mktemp("images")
  rgb = Image.fromarray(random_pixels(301, 437))
  paths = {
      "rgb": directory / "rgb.png",
      "grey": directory / "grey.png",
      "rgba": directory / "rgba.png",
      "palette": directory / "palette.gif",
  }
  rgb.save(paths["rgb"])
  rgb.convert("L").resize((150, 333)).save(paths["grey"])
  rgba = rgb.convert("RGBA")
  rgba.putalpha(Image.fromarray(np.tile(np.arange(437) % 256, (301, 1)).astype(np.uint8)))
  rgba.save(paths["rgba"])
  rgb.quantize(64).save(paths["palette"])
  return {k: str(v) for k, v in paths.items()}


def torch_resnet18(seed=0, favourite=None):
  """A random torchvision resnet18 in eval mode with spread-out logits."""
  torch.manual_seed(seed)
  model = torchvision.models.resnet18().eval()
  with torch.no_grad():
    for layer in model.modules():
      if isinstance(layer, torch.nn.BatchNorm2d):
        layer.running_mean.normal_(0, 0.2)
        layer.running_var.uniform_(0.5, 2.0)
    model.fc.weight.mul_(20.0)
    if favourite is not None:
      model.fc.bias[favourite] = 100.0
  return model


def save_state_dict(model, path):
  torch.save(model.state_dict(), path)
  return str(path)


# ----------------------------------------------------------------------------
# Reading and preparing images
# ----------------------------------------------------------------------------

def test_any_image_mode_reads_as_rgb(image_files):
  for name, path in image_files.items():
    pixels = images.read_rgb(path)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, name
  grey = images.read_rgb(image_files["grey"])
  assert grey.shape == (333, 150, 3)
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_transparency_is_composited_over_white(image_files):
  rgb = images.read_rgb(image_files["rgb"]).astype(int)
  rgba = images.read_rgb(image_files["rgba"]).astype(int)
  np.testing.assert_array_equal(rgba[:, 255], rgb[:, 255])  # alpha 255: unchanged
  np.testing.assert_array_equal(rgba[:, 0], 255)  # alpha 0: the white background
  assert abs(rgba[:, 128] - (rgb[:, 128] * 128 + 255 * 127) / 255).max() <= 1


def test_sixteen_bit_greyscale_and_exif_rotation(tmp_path):
  deep = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
  Image.fromarray(deep).save(tmp_path / "deep.png")
  np.testing.assert_array_equal(images.read_rgb(tmp_path / "deep.png")[0, :, 0], [0, 100, 255])
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  Image.fromarray(random_pixels(20, 40)).save(tmp_path / "phone.jpg", exif=exif)
  assert images.read_rgb(tmp_path / "phone.jpg").shape == (40, 20, 3)


@pytest.mark.parametrize("weight_id", ["resnet50.tv_in1k", "resnet50.tv2_in1k", "resnet50.a1_in1k"])
def test_preprocessing_matches_torchvision_transforms(image_files, weight_id):
  recipe = registry.get(weight_id).preprocessing
  reference = transforms.Compose([
      transforms.Resize(recipe.resize_size, transforms.InterpolationMode(recipe.interpolation)),
      transforms.CenterCrop(recipe.crop_size), transforms.ToTensor(),
      transforms.Normalize(recipe.mean, recipe.std)])
  for name in ("rgb", "grey"):
    expected = reference(Image.open(image_files[name]).convert("RGB")).numpy().transpose(1, 2, 0)
    actual = images.preprocess(image_files[name], recipe)
    assert actual.shape == (1, 224, 224, 3) and actual.dtype == np.float32
    np.testing.assert_allclose(actual[0], expected, atol=1e-5, err_msg=name)


def test_torchvision_registry_preprocessing_is_torchvisions(image_files):
  published = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
  expected = published(Image.open(image_files["rgb"])).numpy().transpose(1, 2, 0)
  actual = images.preprocess(image_files["rgb"], registry.get("resnet50.tv2_in1k").preprocessing)
  np.testing.assert_allclose(actual[0], expected, atol=1e-5)


def test_keras_caffe_and_tf_modes_match_keras():
  imagenet_utils = pytest.importorskip("keras.src.applications.imagenet_utils")
  pixels = random_pixels(5, 7)
  for ours, mode in ((images.CAFFE, "caffe"), (images.TF, "tf")):
    expected = imagenet_utils.preprocess_input(pixels.astype(np.float32), mode=mode,
                                               data_format="channels_last")
    np.testing.assert_allclose(images.normalize(pixels, ours), expected, atol=1e-4, err_msg=mode)
  np.testing.assert_array_equal(images.caffe_normalize(pixels), images.normalize(pixels, images.CAFFE))


def test_preprocessing_round_trips_and_validates():
  assert images.Preprocessing(**images.CAFFE.to_dict()) == images.CAFFE
  assert images.TORCH.with_crop_size(112) == images.Preprocessing(crop_size=112, resize_size=128)
  with pytest.raises(ValueError, match="crop_size"):
    images.Preprocessing(crop_size=300, resize_size=256)
  with pytest.raises(ValueError, match="interpolation"):
    images.Preprocessing(interpolation="cubic")


# ----------------------------------------------------------------------------
# Classifying
# ----------------------------------------------------------------------------

def test_top_k_matches_torchvision(image_files, tmp_path):
  model = torch_resnet18()
  variables = weights.load("resnet18", save_state_dict(model, tmp_path / "r18.pth"),
                           source="torchvision")
  paths = [image_files["rgb"], image_files["grey"]]
  results = classify.classify("resnet18", variables, paths, SMALL, top_k=5)

  reference = transforms.Compose([transforms.Resize(73), transforms.CenterCrop(64),
                                  transforms.ToTensor(),
                                  transforms.Normalize(images.IMAGENET_MEAN, images.IMAGENET_STD)])
  batch = torch.stack([reference(Image.open(p).convert("RGB")) for p in paths])
  with torch.no_grad():
    expected = torch.softmax(model(batch), dim=-1).numpy()
  for guesses, probabilities in zip(results, expected):
    assert [g.index for g in guesses] == list(np.argsort(-probabilities)[:5])
    np.testing.assert_allclose([g.probability for g in guesses],
                               np.sort(probabilities)[::-1][:5], atol=1e-4)
    assert guesses[0].name == f"class {guesses[0].index}"


def test_class_names_and_their_count(image_files, tmp_path):
  model = torch_resnet18(favourite=FAVOURITE_CLASS)
  variables = weights.load("resnet18", save_state_dict(model, tmp_path / "r18.pth"),
                           source="torchvision")
  names = registry.class_names("imagenet1k")
  results = classify.classify("resnet18", variables, list(image_files.values()), SMALL,
                              names, top_k=3)
  assert len(results) == 4
  for guesses in results:
    assert len(guesses) == 3
    assert guesses[0].index == FAVOURITE_CLASS and guesses[0].name == "golden retriever"
    assert guesses[0].probability > 0.99
  with pytest.raises(WeightsError, match="1000 classes but 2 class names"):
    classify.classify("resnet18", variables, [image_files["rgb"]], SMALL, ["cat", "dog"])


def test_cli_on_a_tlflax_checkpoint(image_files, tmp_path, capsys):
  model = torch_resnet18(favourite=FAVOURITE_CLASS)
  path = save_state_dict(model, tmp_path / "r18.pth")
  checkpoint = str(tmp_path / "ckpt")
  native.save(checkpoint, weights.load("resnet18", path, source="torchvision"),
              {"model_name": "resnet18", "source": "torchvision", "input_file": "r18.pth",
               "preprocessing": SMALL.to_dict(), "class_names": "imagenet1k"})
  result = subprocess.run(
      [sys.executable, "-m", "tlflax.cli.classify", "--weights", checkpoint, "--top_k", "2",
       image_files["grey"], image_files["rgba"]],
      capture_output=True, text=True, cwd=REPO_ROOT, check=False)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[1] == image_files["grey"] and lines[4] == image_files["rgba"]
  assert lines[2].endswith("golden retriever") and lines[5].endswith("golden retriever")
  assert len(lines) == 7

  # In-process from here on: the same main(), without another slow start-up.
  names_file = tmp_path / "names.txt"
  names_file.write_text("\n".join(f"thing {i}" for i in range(1000)) + "\n\n")
  assert classify_cli.main(["--model", "resnet18", "--weights", path, "--source", "torchvision",
                        "--class_names", str(names_file), "--image_size", "32", "--top_k", "1",
                        image_files["rgb"]]) == 0
  assert capsys.readouterr().out.splitlines()[-1].endswith(f"thing {FAVOURITE_CLASS}")

  not_an_image = tmp_path / "notes.png"
  not_an_image.write_text("hello")
  assert classify_cli.main(["--weights", checkpoint, str(not_an_image)]) == 1
  error = capsys.readouterr().err
  assert error.startswith("tlflax.cli.classify: error:") and "notes.png" in error
  assert classify_cli.main(["--weights", path, image_files["rgb"]]) == 1
  assert "--model" in capsys.readouterr().err


def test_load_classifier_takes_recipe_from_a_file_name(tmp_path):
  model = torch_resnet18()
  path = save_state_dict(model, tmp_path / "resnet18-f37072fd.pth")
  classifier = classify.load_classifier(path, "resnet18", "torchvision")
  assert classifier.preprocessing == registry.get("resnet18.tv_in1k").preprocessing
  assert classifier.class_names[0] == "tench"
  assert "resnet18.tv_in1k" in classifier.description


# ----------------------------------------------------------------------------
# Folders: images found recursively, accuracy from class folders
# ----------------------------------------------------------------------------

FOLDER_CLASSES = ("tench", "goldfish", "great white shark")  # ImageNet classes 0, 1, 2
COLOURS = ((220, 30, 30), (30, 220, 30), (30, 30, 220))  # what the model calls each of them


def colour_checkpoint(tmp_path):
  """A resnet18 checkpoint whose top guess is ImageNet class 0, 1 or 2 by an image's colour.

  The head compares the pooled features of an image with those of the three
  colours (centred on their mean), with margins of many logits, so the guesses
  are known in advance and mixed; the other 997 classes never win.
  """
  model = torch_resnet18(seed=1)
  body = torch.nn.Sequential(*list(model.children())[:-1])
  with torch.no_grad():
    plain = np.stack([np.full((SMALL.crop_size, SMALL.crop_size, 3), c, np.uint8)
                      for c in COLOURS])
    features = body(torch.tensor(images.normalize(plain, SMALL)).permute(0, 3, 1, 2)).flatten(1)
    centred = features - features.mean(0)
    model.fc.weight.zero_()
    model.fc.bias.fill_(-1e4)
    model.fc.weight[:3] = 100 * centred / centred.norm(dim=1, keepdim=True)
    model.fc.bias[:3] = -model.fc.weight[:3] @ features.mean(0)
  checkpoint = str(tmp_path / "ckpt")
  path = save_state_dict(model, tmp_path / "r18.pth")
  native.save(checkpoint, weights.load("resnet18", path, source="torchvision"),
              {"model_name": "resnet18", "source": "torchvision", "input_file": "r18.pth",
               "preprocessing": SMALL.to_dict(), "class_names": "imagenet1k"})
  return checkpoint


def class_folder_tree(root):
  """Images in class folders, two of them of another class's colour; a misc folder; two non-images.

  Returns:
    {path relative to root: the colour's class index}.
  """
  layout = {"tench/0.png": 0, "tench/1.png": 0, "tench/2.png": 1,
            "goldfish/0.png": 1, "goldfish/1.png": 1, "goldfish/deeper/2.png": 2,
            "great white shark/0.png": 2, "great white shark/1.png": 2, "misc/0.png": 0}
  rng = np.random.default_rng(0)
  for relative, colour in layout.items():
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    noise = rng.integers(-10, 11, (50, 61, 3))  # not flat: every image a little different
    Image.fromarray((np.array(COLOURS[colour]) + noise).astype(np.uint8)).save(root / relative)
  (root / "tench" / "notes.txt").write_text("not an image")
  (root / "tench" / "broken.jpg").write_text("not a jpeg either")
  return layout


def read_csv(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.reader(f))


def test_score_counts_a_known_case():
  scored = image_folders.score([0, 0, 1, None, 2], [0, 1, 1, 0, 5], list("abcdef"))
  assert scored.classes == ["a", "b", "c"] and scored.columns == ["a", "b", "c", "(another class)"]
  np.testing.assert_array_equal(scored.confusion, [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
  assert scored.accuracy == 0.5  # 2 of 4 labelled images; the unlabelled one is left out
  assert image_folders.score([None], [0], ["a"]) is None


def test_classify_a_folder_of_class_folders(tmp_path, capsys):
  checkpoint = colour_checkpoint(tmp_path)
  root = tmp_path / "val"
  colours = class_folder_tree(root)
  report = tmp_path / "report"
  assert classify_cli.main(["--weights", checkpoint, "--top_k", "2", "--output_dir",
                            str(report), str(root)]) == 0
  out = capsys.readouterr().out

  predictions = read_csv(report / "predictions.csv")
  header, rows = predictions[0], predictions[1:]
  assert header[:6] == ["path", "class_folder", "label", "correct", "guess_1", "probability_1"]
  guessed = {os.path.relpath(row[0], root): row[4] for row in rows}
  assert set(guessed) == set(colours)  # found recursively; the note and the broken file skipped
  assert guessed == {path: FOLDER_CLASSES[c] for path, c in colours.items()}  # the model works
  assert f"Skipped 2 files that are not images: {root}/tench/notes.txt (not an image file " in out
  assert f"{root}/tench/broken.jpg (cannot identify image file" in out
  # The misc folder is named, classified, and left out of the accuracy.
  assert (f"{root}: not scored: 1 image in 1 sub-folder that names no class of the model "
          "(classified all the same): 'misc'.") in out
  scored = [row for row in rows if row[2]]
  assert len(scored) == 8 and all(row[2] == row[1] for row in scored)

  # The accuracy is the share of scored images whose top guess is their folder's class.
  right = sum(row[4] == row[2] for row in scored)
  assert all(row[3] == str(int(row[4] == row[2])) for row in scored)
  assert f"Accuracy (top-1): {right / 8:.2%}, {right} of 8 images in 3 class folders." in out
  accuracy = read_csv(report / "accuracy.csv")
  assert accuracy[0] == ["class", "images", "correct", "accuracy"]
  assert accuracy[-1][:3] == ["(all)", "8", str(right)]
  assert float(accuracy[-1][3]) == pytest.approx(right / 8, abs=1e-6)  # written with 6 decimals

  confusion = read_csv(report / "confusion.csv")
  assert confusion[0][1:] == [*FOLDER_CLASSES, "(another class)"]
  assert [row[0] for row in confusion[1:]] == list(FOLDER_CLASSES)
  matrix = np.array([[int(n) for n in row[1:]] for row in confusion[1:]])
  np.testing.assert_array_equal(matrix.sum(axis=1), [3, 3, 2])  # each folder's images
  for r, true in enumerate(FOLDER_CLASSES):
    for c, guess in enumerate(FOLDER_CLASSES):
      assert matrix[r, c] == sum(row[2] == true and row[4] == guess for row in scored)
  np.testing.assert_array_equal(matrix, [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 2, 0]])
  assert right == 6
  for name in ("predictions.csv", "accuracy.csv", "confusion.csv"):
    assert str(report / name) in out
  assert sorted(os.listdir(root)) == ["goldfish", "great white shark", "misc", "tench"]


def test_classify_folders_that_cannot_be_scored(tmp_path, capsys, monkeypatch):
  checkpoint = colour_checkpoint(tmp_path)
  root = tmp_path / "photos"
  for name in ("2023", "2024"):
    (root / name).mkdir(parents=True)
    Image.fromarray(random_pixels(40, 40, len(name))).save(root / name / "a.jpg")
  monkeypatch.chdir(tmp_path)
  assert classify_cli.main(["--weights", checkpoint, "photos"]) == 0
  out = capsys.readouterr().out
  assert "photos: not scored: none of its sub-folders is a class of the model ('2023'" in out
  assert "Accuracy" not in out
  assert sorted(os.listdir(tmp_path / "classify_results")) == ["predictions.csv"]

  # The default report folder would land among the images: refused, before any work.
  monkeypatch.chdir(root)
  assert classify_cli.main(["--weights", checkpoint, "."]) == 1
  error = capsys.readouterr().err
  assert error.startswith("tlflax.cli.classify: error: The reports would be written to "
                          "classify_results, inside the image folder .;")
  assert not (root / "classify_results").exists()
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.md").write_text("no images here")
  assert classify_cli.main(["--weights", checkpoint, str(empty)]) == 1
  assert f"{empty} holds no image files" in capsys.readouterr().err
