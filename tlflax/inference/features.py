"""A pretrained network as a standalone feature extractor: images in, arrays out.

    python -m tlflax.cli.features --config configs/digits.py --output features/digits \\
        --config.init.weights=workdirs/digits --config.init.source=workdir --stage stage3

runs the backbone in inference mode over every example of each split (eval
preprocessing, no augmentation, in dataset order) and writes

    DIR/<split>_features.npy   float32 (examples, C); (examples, H, W, C) with --pool none
    DIR/<split>_labels.npy     int32 (examples,)
    DIR/info.json              model, weights, stage, pool, shapes, class names, data config

`--stage` is any stage of the model (`stem`, `stage1`..., VGG `fc`),
`pre_logits` (the pooled vector the head sees) or `logits` (weights with a
head only). A body stage runs a model truncated there, so nothing after it is
computed. Weights come from the config as for training (`config.init.weights`
and `config.init.source`, `source="workdir"` for a training run's final
state); without weights the network is randomly initialised (a baseline). Any
config key can be overridden with `--config.key=value`. `load(DIR, split)`
reads the arrays back; `tlflax.inference.linear_probe` fits linear heads on them.

With `data.skip_bad_files=True`, examples whose files fail to decode are
left out: the arrays hold the others, in order (features and labels row for
row), a warning names the skipped files, and info.json lists them per split
(`skipped_files`: the example's position in the split and its name).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from tlflax import build, data, files, models, tree
from tlflax.data import images as image_files
from tlflax.tree import flatten, unflatten
from tlflax.weights.merge import model_shapes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "eval")
POOLS = ("avg", "none")
INFO_FILE = "info.json"
# Files this module (and the linear probe on its output) writes into a directory.
_OWN_FILES = tuple(f"{split}_{kind}.npy" for split in SPLITS for kind in ("features", "labels")
                   ) + (INFO_FILE, "linear_probe.json")


def variables_for(model, variables, image_size: int):
  """The part of `variables` that `model` (e.g. a truncated one) uses.

  Args:
    model: the module the variables will be applied with.
    variables: variables of a model that contains it (same names).
    image_size: input side, to trace `model.init` (no computation).

  Returns:
    `variables` restricted to the names `model.init` creates.
  """
  wanted = model_shapes(model, image_size)
  flat = flatten(variables)
  missing = sorted(wanted.keys() - flat.keys())
  if missing:
    raise ValueError(f"The variables lack {len(missing)} entries the model needs, e.g. "
                     f"{missing[:3]}.")
  return unflatten({k: v for k, v in flat.items() if k in wanted})


def extract(model, variables, dataset, stage: str, pool: str = "avg",
            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Features of one stage for every example of an evaluation dataset.

  Runs the model in inference mode (BatchNorm on running statistics), one
  compiled function for all batches; the padding rows of the last batch are
  dropped, so row i is example i of the split. With `skip_bad_files`, the
  examples whose files fail to decode are dropped too (a warning names them;
  `extract_with_skipped` also returns which they were).

  Args:
    model: a backbone from `tlflax.models.get_model` (it is truncated here
      when `stage` is a body stage).
    variables: its `{"params", "batch_stats"}`.
    dataset: a `tlflax.data` Dataset built with `training=False`.
    stage: one of `tlflax.models.feature_names(model)`, e.g. "stage3" or "pre_logits".
    pool: "avg" averages spatial maps over height and width, and a Vision
      Transformer stage's tokens over the tokens, to (N, C); "none" keeps
      (N, H, W, C) or (N, tokens, C). Vectors (pre_logits, logits, fc) stay (N, C).
    progress: show a tqdm progress bar.

  Returns:
    `(features, labels)`: float32 (examples, ...) and int32 (examples,), one row per example
    that decoded.

  Examples:
    >>> evaluation = data.build(config.data, split="eval", training=False,
    ...                         global_batch_size=200)
    >>> features, labels = extract(model, variables, evaluation, "stage2")
    >>> features.shape
    (180, 32)
  """
  features, labels, _ = extract_with_skipped(model, variables, dataset, stage, pool, progress)
  return features, labels


def extract_with_skipped(model, variables, dataset, stage: str, pool: str = "avg",
                         progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[dict]]:
  """`extract`, and the examples it left out because their files fail to decode.

  Args:
    model: as in `extract`.
    variables: as in `extract`.
    dataset: as in `extract`.
    stage: as in `extract`.
    pool: as in `extract`.
    progress: as in `extract`.

  Returns:
    `(features, labels, skipped)`: the arrays of the examples that decoded, in
    order, and one `{"example": position in the split, "name": file}` per
    skipped example (empty unless the dataset has `skip_bad_files`).
  """
  features, labels, skipped = extract_stages(model, variables, dataset, [stage], pool, progress)
  return features[stage], labels, skipped


def last_computed(model, stages: Sequence[str], model_name: str = "this model") -> str:
  """The one of `stages` that the network computes last (computing it computes all).

  Args:
    model: a backbone from `tlflax.models.get_model`.
    stages: names from `tlflax.models.feature_names(model)`.
    model_name: how an error names the model, e.g. "'resnet18'".

  Raises:
    ValueError: a body stage or "pre_logits" that the model lacks (listing its
      features); "logits" is checked where the weights say whether there is a
      head (`tlflax.build.build_extractor`, `tlflax.models.model_for_stage`).
  """
  for stage in stages:
    if stage != models.LOGITS:
      models.check_stage(model, stage, model_name)
  order = [*model.stage_names, models.PRE_LOGITS, models.LOGITS]
  return max(stages, key=order.index)


def extract_stages(model, variables, dataset, stages: Sequence[str], pool: str = "avg",
                   progress: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict]]:
  """`extract_with_skipped` for several stages in one pass over the data.

  The network runs once per batch, truncated after the last of `stages`, in
  one compiled program that returns every stage asked for: one decode of the
  images and one compilation, where extracting the stages one by one pays
  both per stage (a ranking of every stage of a network, `tlflax rank`).

  Args:
    model: as in `extract`.
    variables: as in `extract`.
    dataset: as in `extract`.
    stages: names from `tlflax.models.feature_names(model)`.
    pool: as in `extract`, for every stage.
    progress: as in `extract`.

  Returns:
    `({stage: features}, labels, skipped)`, as `extract_with_skipped` returns
    them for each stage.
  """
  stages = list(dict.fromkeys(stages))
  if not stages:
    raise ValueError("No stages to extract.")
  if pool not in POOLS:
    raise ValueError(f"Unknown pool {pool!r}; use one of {POOLS}.")
  if dataset.training:
    raise ValueError("extract needs a dataset built with training=False: a training "
                     "dataset augments the images and drops the last partial batch.")
  if dataset.process_count != 1:
    raise ValueError("extract reads every example in one process; build the dataset with "
                     "process_count=1.")
  model = models.model_for_stage(model, last_computed(model, stages))
  variables = variables_for(model, variables, dataset.image_size)

  prepare = dataset.device_transform()

  def pooled(out):
    out = out.astype(jnp.float32)
    if pool == "avg" and out.ndim in (3, 4):
      # A feature map (N, H, W, C) or a transformer's tokens (N, T, C).
      out = jnp.mean(out, axis=tuple(range(1, out.ndim - 1)))
    return out

  # Variables as an argument, not a closure: XLA would embed them as constants.
  @jax.jit
  def features_of(variables, images):
    outputs = models.extract_features(model, variables, prepare(images), stages)
    return {stage: pooled(out) for stage, out in outputs.items()}

  features = labels = None
  done = 0
  skipped = []
  batches = tqdm.tqdm(dataset.batches(epoch=0), total=dataset.steps_per_epoch,
                      desc=f"{', '.join(stages)} features", unit="batch",
                      disable=not progress)
  for step, batch in enumerate(batches):
    # Rows left out: padding, and (skip_bad_files) files that fail to decode.
    real = batch["mask"] > 0
    for row in np.flatnonzero(batch.get("skipped", ())):
      position = step * dataset.local_batch_size + int(row)
      skipped.append({"example": position, "name": dataset.source.example_name(
          int(dataset.example_ids[position]))})
    outputs = {stage: np.asarray(out)[real]
               for stage, out in features_of(variables, batch["image"]).items()}
    if features is None:  # allocated once the per-example shapes are known
      features = {stage: np.empty((dataset.num_examples, *out.shape[1:]), np.float32)
                  for stage, out in outputs.items()}
      labels = np.empty((dataset.num_examples,), np.int32)
    count = len(next(iter(outputs.values())))
    for stage, out in outputs.items():
      features[stage][done:done + count] = out
    labels[done:done + count] = batch["label"][real]
    done += count
  if features is None:
    raise ValueError("The dataset has no examples to extract features from.")
  if done + len(skipped) != dataset.num_examples:
    raise RuntimeError(f"Read {done} examples and skipped {len(skipped)}, expected "
                       f"{dataset.num_examples}.")
  if done == 0:
    raise image_files.ImageError(
        f"None of the {dataset.num_examples} examples could be decoded, e.g. "
        f"{skipped[0]['name']}; check the data.")
  if skipped:
    names = ", ".join(s["name"] for s in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    log.warning("Features left out %d of %d examples whose files fail to decode "
                "(data.skip_bad_files=True): %s. The features and labels hold the other %d, "
                "in order.", len(skipped), dataset.num_examples, names, done)
  return {stage: values[:done] for stage, values in features.items()}, labels[:done], skipped


def describe_weights(config) -> dict:
  """The model and weights a config names, as `info.json` records them."""
  return {"model": config.model.name, "dtype": config.model.dtype,
          "last_stage": config.model.last_stage, "weights": config.init.weights,
          "source": config.init.source, "options": config.model.get("options", ""),
          "start": "pretrained" if config.init.weights else "scratch"}


def load(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads the features and labels `python -m tlflax.cli.features` wrote.

  Args:
    directory: the `--output` directory.
    split: "train" or "eval".

  Returns:
    `(features, labels)`: float32 and int32 arrays, one row per example.

  Examples:
    >>> train_x, train_y = load("features/digits", "train")
  """
  directory = os.fspath(directory)
  paths = [os.path.join(directory, f"{split}_{kind}.npy") for kind in ("features", "labels")]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"No {split} features in {directory!r} ({', '.join(missing)} missing); write them "
        f"with: python -m tlflax.cli.features --config ... --output {directory} --splits {split}")
  features, labels = (np.load(p) for p in paths)
  if len(features) != len(labels):
    raise ValueError(f"{paths[0]} has {len(features)} rows but {paths[1]} has {len(labels)}.")
  return features, labels


def read_info(directory: str | os.PathLike) -> dict:
  """The `info.json` of a features directory (model, stage, shapes, class names...)."""
  path = os.path.join(os.fspath(directory), INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; {directory!r} holds no features "
                            "written by python -m tlflax.cli.features.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def existing_info(directory: str, extraction: dict, overwrite: bool) -> dict | None:
  """The info of `directory` if it holds features of this same extraction.

  Args:
    directory: the output directory (it may not exist yet).
    extraction: what defines the features (model, weights, stage, pool, data).
    overwrite: allow replacing features of another extraction.

  Returns:
    The existing info dict when `extraction` matches (new splits are then
    added to it); None when there is nothing to keep.

  Raises:
    FileExistsError: the directory holds other files this module writes and
      `overwrite` is False; the message says what differs.
  """
  present = _own_files(directory)
  if not present:
    return None
  info = None
  if INFO_FILE in present:
    info = read_info(directory)
    if info.get("extraction") == tree.to_json(extraction):
      return info
  if overwrite:
    return None
  if info is None:
    why = f"holds {', '.join(present)} without an {INFO_FILE}"
  else:
    old, new = info.get("extraction", {}), tree.to_json(extraction)
    differences = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
                   for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    why = "holds features of a different extraction (" + "; ".join(differences) + ")"
  raise FileExistsError(f"{directory!r} {why}. Choose another --output, or pass "
                        "--overwrite to replace them.")


def _own_files(directory: str) -> list[str]:
  return [f for f in _OWN_FILES if os.path.exists(os.path.join(directory, f))]


def extract_to_directory(config, output: str, stage: str = models.PRE_LOGITS,
                         splits: Sequence[str] = SPLITS, pool: str = "avg",
                         overwrite: bool = False, progress: bool = True,
                         reuse: bool = False) -> dict:
  """What the command line does: extract `splits` and write them under `output`.

  A directory holding features of the same extraction keeps them (other
  splits are added); one holding anything else this module writes is refused
  unless `overwrite`, which removes those files once the model has loaded.
  With `reuse`, a split already written by the same extraction is kept as it
  is (nothing is loaded or run when every split is there).

  Args:
    config: a tlflax config (model, init weights, data, eval_batch_size, seed).
    output: the directory to write.
    stage: the feature to extract (see `tlflax.models.feature_names`).
    splits: any of "train" and "eval" (the config's train/eval splits).
    pool: "avg" or "none" (see `extract`).
    overwrite: replace features of another extraction in `output`.
    progress: show progress bars.
    reuse: keep the splits the same extraction already wrote.

  Returns:
    The info dict written to `output/info.json`.
  """
  return extract_to_directories(config, {stage: output}, splits, pool, overwrite, progress,
                                reuse)[stage]


def extract_to_directories(config, outputs: Mapping[str, str], splits: Sequence[str] = SPLITS,
                           pool: str = "avg", overwrite: bool = False, progress: bool = True,
                           reuse: bool = False) -> dict[str, dict]:
  """`extract_to_directory` for several stages of one network, in one pass per split.

  Each stage gets its own directory, exactly as `extract_to_directory` would
  write it, but the images are decoded and the network run once per split
  for all the stages that need it (`extract_stages`). Each stage's
  `seconds` is its share of the pass (the pass's time over its stages);
  `pass_stages` names the stages that shared it.

  Args:
    config: as in `extract_to_directory`.
    outputs: `{stage: directory}`.
    splits: as in `extract_to_directory`, for every stage.
    pool: as in `extract_to_directory`.
    overwrite: as in `extract_to_directory`.
    progress: as in `extract_to_directory`.
    reuse: as in `extract_to_directory`.

  Returns:
    `{stage: the info dict written to its directory}`.
  """
  splits = list(dict.fromkeys(splits))
  unknown = [s for s in splits if s not in SPLITS]
  if unknown or not splits:
    raise ValueError(f"Unknown splits {unknown}; use one or both of {', '.join(SPLITS)} "
                     "(the config's data.train_split and data.eval_split).")
  if pool not in POOLS:
    raise ValueError(f"Unknown pool {pool!r}; use one of {POOLS}.")
  config = build.with_data_normalization(config)  # unset mean / std: the weights' own
  data_config = config.data.to_dict()
  data_config.pop("augment")  # features are never augmented: it changes nothing here
  infos, todo = {}, {}
  for stage, output in outputs.items():
    extraction = {**describe_weights(config), "stage": stage, "pool": pool,
                  "seed": config.seed, "data": data_config}
    # Refused before anything is loaded; nothing is removed unless loading worked.
    info = existing_info(output, extraction, overwrite)
    wanted = splits
    if reuse and info is not None:
      wanted = [s for s in splits if s not in info["splits"] or not all(
          os.path.exists(os.path.join(output, f"{s}_{kind}.npy"))
          for kind in ("features", "labels"))]
    infos[stage] = info if info is not None else {
        "format_version": FORMAT_VERSION, "extraction": tree.to_json(extraction), "splits": {},
        "fresh": True}
    if wanted:
      todo[stage] = wanted
  if not todo:
    return infos
  extractor = build.build_extractor(
      config, last_computed(build.make_model(config), list(todo), repr(config.model.name)))
  for stage in todo:
    output = outputs[stage]
    if infos[stage].pop("fresh", False):
      for name in _own_files(output):
        os.remove(os.path.join(output, name))
    os.makedirs(output, exist_ok=True)
  for split in splits:
    stages = [stage for stage, wanted in todo.items() if split in wanted]
    if not stages:
      continue
    started = time.perf_counter()
    dataset = data.build(config.data, split=split, training=False,
                         global_batch_size=config.eval_batch_size, seed=config.seed)
    features, labels, skipped = extract_stages(extractor.model, extractor.variables, dataset,
                                               stages, pool, progress)
    seconds = time.perf_counter() - started
    for stage in stages:
      output, info = outputs[stage], infos[stage]
      np.save(os.path.join(output, f"{split}_features.npy"), features[stage])
      np.save(os.path.join(output, f"{split}_labels.npy"), labels)
      info["class_names"] = list(dataset.class_names)
      info["num_classes"] = dataset.num_classes
      info["preprocessing"] = tree.to_json(dataset.preprocessing.to_dict())
      # num_examples counts the rows written: the split's examples less those skipped.
      info["splits"][split] = {
          "num_examples": int(len(labels)), "features_shape": list(features[stage].shape),
          "labels_shape": list(labels.shape), "skipped_files": skipped,
          # Reading, decoding and the network (this stage's share of the
          # pass), model loading excluded.
          "seconds": round(seconds / len(stages), 3), "pass_stages": stages}
      # Written after every split, so a directory never lists a split it lacks.
      files.write_json(os.path.join(output, INFO_FILE), info)
  return infos
