"""The images a command line names, labels from class folders, and accuracy.

    tlflax classify --weights workdirs/flowers data/flowers/val --output_dir val_report

A folder is searched recursively for image files (`find_images`; the
extensions an image-folder dataset reads, `tlflax.data.sources`). When its
sub-folders are named after the model's classes (`root/<class>/...`, e.g. a
validation split laid out for training), each image's sub-folder is its
label (`folder_labels`), and `score` counts top-1 accuracy per class and a
confusion matrix; `write_reports` writes them, and every image's guesses
(from `tlflax.inference.classify.classify`), as CSV files.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import difflib
import glob
import io
import os
from typing import Any, Sequence

import numpy as np

from tlflax import files
from tlflax.data import images
from tlflax.data.sources import IMAGE_EXTENSIONS
from tlflax.inference.classify import Guess

PREDICTIONS_FILE, ACCURACY_FILE, CONFUSION_FILE = (
    "predictions.csv", "accuracy.csv", "confusion.csv")
OTHER_CLASSES = "(another class)"  # the confusion column of guesses no class folder names
_NAMES_LISTED = 5  # a message names this many files or folders, then counts the rest


@dataclasses.dataclass(frozen=True)
class FoundImages:
  """The images that command-line arguments name, in order.

  Attributes:
    paths: every image: a file as given, or one found in a folder (sorted).
    folders: per image, the folder argument it was found in, or None for a
      file named directly.
    class_folders: per image, the sub-folder of its folder argument that
      holds it (directly or further down: `val/cat/a/1.jpg` -> "cat"), or
      None (named directly, or lying in the folder argument itself).
    skipped: files found in folders that are not images, with the reason.
  """
  paths: list[str]
  folders: list[str | None]
  class_folders: list[str | None]
  skipped: list[tuple[str, str]]


def find_images(arguments: Sequence[str], exclude: Sequence[str] = ()) -> FoundImages:
  """Image files, folders (searched recursively) and glob patterns -> the images they name.

  A file named directly is kept as it is (an error names it later if it is
  no image). In a folder, files with an image extension (`IMAGE_EXTENSIONS`,
  as an image-folder dataset reads) whose header reads as an image are
  found; other files are `skipped`; hidden files and folders are ignored.

  Args:
    arguments: paths of files or folders, or glob patterns ("photos/*.jpg").
    exclude: folders not to search (e.g. where the reports are written).

  Returns:
    A `FoundImages`.

  Raises:
    FileNotFoundError: a path that does not exist, or a pattern that matches nothing.
    ValueError: a folder that holds no image files.

  Examples:
    >>> find_images(["val"]).class_folders[:2]   # val/cat/1.jpg, val/cat/2.jpg
    ['cat', 'cat']
  """
  excluded = {os.path.realpath(path) for path in exclude}
  paths, folders, class_folders, skipped = [], [], [], []
  for argument in _expand_patterns(arguments):
    if os.path.isdir(argument):
      found, not_images = _images_in_folder(argument, excluded)
      if not found:
        raise ValueError(f"{argument} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
                         + (f"; {_plural(len(not_images), 'file')} in it are not images: "
                            f"{_name_files(not_images)}" if not_images else "") + ".")
      for path in found:
        relative = os.path.relpath(path, argument).split(os.sep)
        paths.append(path)
        folders.append(argument)
        class_folders.append(relative[0] if len(relative) > 1 else None)
      skipped += not_images
    elif os.path.exists(argument):
      paths.append(argument)
      folders.append(None)
      class_folders.append(None)
    else:
      raise FileNotFoundError(2, "No such file or folder", argument)
  return FoundImages(paths, folders, class_folders, skipped)


def check_outside_folders(output_dir: str, found: FoundImages) -> None:
  """Raises a ValueError when `output_dir` lies in one of the image folders searched.

  The reports' default folder must not land among the user's images
  (`tlflax classify .` run inside an image folder); a folder the user names
  may.
  """
  output = os.path.realpath(output_dir)
  for folder in dict.fromkeys(f for f in found.folders if f is not None):
    real = os.path.realpath(folder)
    if output == real or output.startswith(real.rstrip(os.sep) + os.sep):
      raise ValueError(f"The reports would be written to {output_dir}, inside the image folder "
                       f"{folder}; pass --output_dir with a folder elsewhere (or that one, to "
                       "write there anyway).")


def _expand_patterns(arguments: Sequence[str]) -> list[str]:
  """Glob patterns a shell did not expand (quoted, or on Windows) -> the paths they match."""
  expanded = []
  for argument in arguments:
    if os.path.exists(argument) or not any(c in argument for c in "*?["):
      expanded.append(argument)
      continue
    matches = sorted(glob.glob(argument, recursive=True))
    if not matches:
      raise FileNotFoundError(f"No file or folder matches {argument}.")
    expanded += matches
  return expanded


def _images_in_folder(folder: str, excluded: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """The image files under `folder` (sorted, links followed once) and the files that are not."""
  candidates, not_images, seen = [], [], set()
  for directory, subdirectories, names in os.walk(folder, followlinks=True):
    real = os.path.realpath(directory)
    if real in seen or real in excluded:  # a link back up the tree, or the reports' folder
      subdirectories[:] = []
      continue
    seen.add(real)
    subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
    for name in sorted(names):
      if name.startswith("."):
        continue
      path = os.path.join(directory, name)
      if name.lower().endswith(IMAGE_EXTENSIONS):
        candidates.append(path)
      else:
        not_images.append((path, "not an image file name"))
  # The header of each file: a damaged or mislabelled file is skipped here,
  # not found halfway through the run.
  with concurrent.futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
    problems = list(pool.map(images.check_header, candidates))
  found = [path for path, problem in zip(candidates, problems) if not problem]
  not_images += [(path, problem) for path, problem in zip(candidates, problems) if problem]
  return found, not_images


def _plural(count: int, noun: str) -> str:
  return f"{count} {noun}{'' if count == 1 else 's'}"


def _name_files(skipped: Sequence[tuple[str, str]]) -> str:
  """The first few files with why each is no image, then how many more."""
  listed = ", ".join(f"{path} ({why})" for path, why in skipped[:_NAMES_LISTED])
  more = len(skipped) - _NAMES_LISTED
  return listed + (f" and {more} more" if more > 0 else "")


def describe_skipped(found: FoundImages) -> str | None:
  """One line on the files in folders that are not images (None when there are none)."""
  if not found.skipped:
    return None
  return (f"Skipped {_plural(len(found.skipped), 'file')} that "
          f"{'is' if len(found.skipped) == 1 else 'are'} not images: "
          f"{_name_files(found.skipped)}.")


@dataclasses.dataclass(frozen=True)
class FolderLabels:
  """What the class folders say about each image.

  Attributes:
    labels: per image, the index of the class its class folder is named
      after, or None (not in a class folder, or in one the model lacks).
    notes: one line per folder argument, or part of one, that cannot be
      scored, saying why (e.g. sub-folders that name no class of the model).
  """
  labels: list[int | None]
  notes: list[str]


def folder_labels(found: FoundImages, class_names: Sequence[str] | None) -> FolderLabels:
  """Labels from class folders: `root/<class name>/.../image` is an image of that class.

  A folder argument is read as one sub-folder per class when at least one of
  its sub-folders is named exactly after a class of the model; sub-folders
  that name no class, and images lying in the folder itself, are classified
  but left out of the accuracy, and a note lists them (with the nearest
  class names), so an accuracy is never computed over folders it cannot
  judge.

  Args:
    found: from `find_images`.
    class_names: the model's class names, in output order; None when unknown.

  Returns:
    A `FolderLabels`.
  """
  index = {name: i for i, name in enumerate(class_names or ())}
  labels: list[int | None] = [None] * len(found.paths)
  notes = []
  for folder in dict.fromkeys(f for f in found.folders if f is not None):
    mine = [i for i, f in enumerate(found.folders) if f == folder]
    sub_folders = list(dict.fromkeys(found.class_folders[i] for i in mine
                                     if found.class_folders[i] is not None))
    if not sub_folders:
      continue  # a plain folder of images: nothing to score
    if class_names is None:
      notes.append(f"{folder}: not scored: the model's classes have no names to match its "
                   "sub-folders with; pass --class_names FILE (one name per line, in the "
                   "model's order).")
      continue
    known = [name for name in sub_folders if name in index]
    unknown = [name for name in sub_folders if name not in index]
    if not known:
      notes.append(f"{folder}: not scored: none of its sub-folders is a class of the model "
                   f"({_with_nearest(unknown, class_names)}); to score images, pass a folder "
                   "whose sub-folders are named after the model's classes (e.g. "
                   + ", ".join(repr(name) for name in list(class_names)[:3]) + ").")
      continue
    for i in mine:
      if found.class_folders[i] in index:
        labels[i] = index[found.class_folders[i]]
    if unknown:
      count = sum(found.class_folders[i] in unknown for i in mine)
      notes.append(f"{folder}: not scored: {_plural(count, 'image')} in "
                   f"{_plural(len(unknown), 'sub-folder')} that "
                   f"{'names' if len(unknown) == 1 else 'name'} no class of the model "
                   f"(classified all the same): {_with_nearest(unknown, class_names)}.")
    loose = sum(found.class_folders[i] is None for i in mine)
    if loose:
      notes.append(f"{folder}: not scored: {_plural(loose, 'image')} lying beside its class "
                   "folders (classified all the same).")
  return FolderLabels(labels, notes)


def _with_nearest(folder_names: Sequence[str], class_names: Sequence[str]) -> str:
  """'dgo' (nearest class: 'dog'), 'misc', ... for the first few folder names."""
  parts = []
  for name in folder_names[:_NAMES_LISTED]:
    # 0.7, above difflib's 0.6: a typo ("golden retriver"), not any short name ("misc", "mantis").
    nearest = difflib.get_close_matches(name, list(class_names), n=1, cutoff=0.7)
    parts.append(repr(name) + (f" (nearest class: {nearest[0]!r})" if nearest else ""))
  more = len(folder_names) - _NAMES_LISTED
  return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


@dataclasses.dataclass(frozen=True)
class Score:
  """Top-1 accuracy of the images with labels, per class, and their confusion matrix.

  Attributes:
    classes: the classes that have images, in the model's order.
    class_indices: their indices among the model's outputs.
    images: per class, how many images it has.
    correct: per class, how many of them the model's top guess gets right.
    confusion: int64 (len(classes), len(columns)): row = the images of a
      class, column = the model's top guess; each row sums to `images`.
    columns: `classes`, then `OTHER_CLASSES` when the model has classes
      that no folder holds (guesses of those are counted there).
  """
  classes: list[str]
  class_indices: list[int]
  images: np.ndarray
  correct: np.ndarray
  confusion: np.ndarray
  columns: list[str]

  @property
  def accuracy(self) -> float:
    """The fraction of all scored images whose top guess is their class."""
    return float(self.correct.sum() / self.images.sum())


def score(labels: Sequence[int | None], predictions: Sequence[int],
          class_names: Sequence[str]) -> Score | None:
  """Accuracy and confusion matrix of the top guesses of the images that have labels.

  Args:
    labels: per image, its class index or None (not scored), e.g.
      `folder_labels(...).labels`.
    predictions: per image, the index of the model's top guess.
    class_names: the model's class names.

  Returns:
    A `Score`, or None when no image has a label.

  Examples:
    >>> score([0, 0, 1, None], [0, 1, 1, 2], ["cat", "dog", "fox"]).accuracy
    0.6666666666666666
  """
  pairs = [(label, int(guess)) for label, guess in zip(labels, predictions) if label is not None]
  if not pairs:
    return None
  class_indices = sorted({label for label, _ in pairs})
  row = {index: r for r, index in enumerate(class_indices)}
  columns = [class_names[i] for i in class_indices]
  if len(class_indices) < len(class_names):
    columns.append(OTHER_CLASSES)
  confusion = np.zeros((len(class_indices), len(columns)), np.int64)
  for label, guess in pairs:
    confusion[row[label], row.get(guess, len(class_indices))] += 1
  return Score(classes=columns[:len(class_indices)], class_indices=class_indices,
               images=confusion.sum(axis=1), correct=np.diag(confusion).copy(),
               confusion=confusion, columns=columns)


def format_score(score_: Score, max_classes: int = 20) -> str:
  """The accuracy with its counts, then per class and the confusion matrix (if not too many)."""
  total, right = int(score_.images.sum()), int(score_.correct.sum())
  lines = [f"Accuracy (top-1): {score_.accuracy:.2%}, {right} of {total} images in "
           f"{len(score_.classes)} class folders."]
  if len(score_.classes) > max_classes:
    lines.append(f"(Per class and the confusion matrix: {len(score_.classes)} classes, too "
                 "many to print; see the CSV files.)")
    return "\n".join(lines)
  width = max(len(name) for name in score_.classes + ["class"])
  lines += ["", f"  {'class':<{width}}  images  correct  accuracy"]
  lines += [f"  {name:<{width}}  {n:6d}  {c:7d}  {c / n:8.2%}"
            for name, n, c in zip(score_.classes, score_.images, score_.correct)]
  lines += ["", "Confusion matrix (rows: the class folder; columns: the top guess):"]
  widths = [max(len(name), 3) for name in score_.columns]
  lines.append(f"  {'':<{width}}  " + "  ".join(f"{name:>{w}}" for name, w in
                                                zip(score_.columns, widths)))
  for name, counts in zip(score_.classes, score_.confusion):
    lines.append(f"  {name:<{width}}  " + "  ".join(f"{int(n):>{w}}" for n, w in
                                                  zip(counts, widths)))
  return "\n".join(lines)


def write_reports(directory: str | os.PathLike, found: FoundImages,
                  guesses: Sequence[Sequence[Guess]], labels: Sequence[int | None],
                  class_names: Sequence[str] | None, score_: Score | None) -> list[str]:
  """Writes every image's guesses, and the accuracy and confusion matrix, as CSV files.

  Args:
    directory: where to write (created if missing).
    found: the images, from `find_images`.
    guesses: per image, from `classify`.
    labels: per image, its class index or None, from `folder_labels`.
    class_names: the model's class names (None: "class <i>").
    score_: from `score`; None writes only the predictions.

  Returns:
    The paths written: `predictions.csv` (path, class folder, label, whether
    the top guess is right, then each guess and its probability), and with
    a score `accuracy.csv` (per class and all) and `confusion.csv`.
  """
  top_k = max((len(g) for g in guesses), default=0)
  rows = [["path", "class_folder", "label", "correct"]
          + [f"{kind}_{k}" for k in range(1, top_k + 1) for kind in ("guess", "probability")]]
  for path, class_folder, label, image_guesses in zip(found.paths, found.class_folders, labels,
                                                      guesses):
    name = "" if label is None else (class_names[label] if class_names else f"class {label}")
    right = "" if label is None else int(image_guesses[0].index == label)
    rows.append([path, class_folder or "", name, right]
                + [value for g in image_guesses for value in (g.name, f"{g.probability:.6f}")])
  written = [_write_csv(os.path.join(directory, PREDICTIONS_FILE), rows)]
  if score_ is not None:
    accuracy_rows = [["class", "images", "correct", "accuracy"]]
    accuracy_rows += [[name, int(n), int(c), f"{c / n:.6f}"] for name, n, c in
                      zip(score_.classes, score_.images, score_.correct)]
    accuracy_rows.append(["(all)", int(score_.images.sum()), int(score_.correct.sum()),
                          f"{score_.accuracy:.6f}"])
    written.append(_write_csv(os.path.join(directory, ACCURACY_FILE), accuracy_rows))
    confusion_rows = [["class \\ top guess", *score_.columns]]
    confusion_rows += [[name, *map(int, counts)] for name, counts in
                       zip(score_.classes, score_.confusion)]
    written.append(_write_csv(os.path.join(directory, CONFUSION_FILE), confusion_rows))
  return written


def _write_csv(path: str, rows: Sequence[Sequence[Any]]) -> str:
  text = io.StringIO()
  csv.writer(text, lineterminator="\n").writerows(rows)
  files.write_text(path, text.getvalue())
  return path
