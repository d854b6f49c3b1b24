"""Linear probes on cached features: hyperparameters chosen without the eval split.

    python -m tlflax.cli.linear_probe --features features/digits \\
        --learning_rates 1e-3,1e-2,1e-1 --weight_decays 0,1e-4,1e-3 --steps 500

reads what `python -m tlflax.cli.features` wrote and runs `select_and_evaluate`:

1. the train features are split into k stratified folds (5, fewer when a
   class has fewer examples); every (learning rate, weight decay) pair of
   the grid is trained on k-1 folds and scored on the fold left out;
2. the pair with the best mean held-out accuracy is chosen (ties: the
   stronger regularisation, i.e. the larger weight decay, then the smaller
   learning rate);
3. one head with that pair is trained on all train features and scored on
   the eval split, once.

The cross-validation accuracy (mean ± sample standard deviation over folds)
is what the choice was made on; the eval accuracy is an unbiased test of the
chosen head, because the eval split took no part in the choice. A choice on
the edge of its grid is reported with a warning: the best value may lie
beyond the grid.

Every head minimises the same objective, L2-regularised multinomial logistic
regression on standardised features (mean 0, variance 1 per feature, with the
statistics of the rows it trains on):

    mean cross-entropy + weight_decay / 2 * ||kernel||^2      (the bias is not decayed)

with Adam at the head's learning rate from zero weights. All heads of all
folds train together: the per-head step is `jax.vmap`-ed over folds and grid
points inside one `jax.jit`, and minibatches (if any) come in one seeded order
per fold shared by every head, so a head gives the numbers it would give
trained alone on its fold.

The pieces are public: `cross_validate` (the held-out accuracy of every point
on every fold, with the fold's heads), `choose`, `fit` (one head on all rows)
and `edge_warnings`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)

RESULT_FILE = "linear_probe.json"
DEFAULT_FOLDS = 5
TIE_RULE = ("ties go to the stronger regularisation: the larger weight decay, then the "
            "smaller learning rate")
# Features whose train standard deviation is below this are constant: left unscaled.
_CONSTANT_STD = 1e-8
# Keeps the random stream of the fold assignment apart from the minibatch order's.
_FOLD_STREAM = 7


@dataclasses.dataclass(frozen=True, eq=False)
class LinearProbe:
  """One trained head with the standardisation it expects.

  `logits(x) = ((x - mean) / scale) @ kernel + bias`, x flattened per example.

  Attributes:
    mean, scale: float32 (D,), the per-feature statistics of its training rows.
    kernel: float32 (D, num_classes).
    bias: float32 (num_classes,).
  """
  mean: np.ndarray
  scale: np.ndarray
  kernel: np.ndarray
  bias: np.ndarray

  def logits(self, features: np.ndarray) -> np.ndarray:
    """float32 (N, num_classes) for features of shape (N, ...)."""
    x = (_flatten(features) - self.mean) / self.scale
    return x @ self.kernel + self.bias

  def predict(self, features: np.ndarray) -> np.ndarray:
    """The predicted class of each row of `features` (int64 (N,))."""
    return np.argmax(self.logits(features), axis=-1)


def accuracy(probe: LinearProbe, features: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of `labels` that `probe` predicts.

  Args:
    probe: a trained `LinearProbe`.
    features: (N, ...) features.
    labels: int (N,) classes.

  Returns:
    A float in [0, 1].

  Examples:
    >>> accuracy(result.probe, eval_x, eval_y)
    0.9722
  """
  labels = np.asarray(labels)
  if len(features) != len(labels) or len(labels) == 0:
    raise ValueError(f"Need as many labels as features, at least one: {len(features)} "
                     f"features, {len(labels)} labels.")
  return float(np.mean(probe.predict(features) == labels))


def _flatten(features) -> np.ndarray:
  features = np.asarray(features, np.float32)
  if features.ndim < 2:
    raise ValueError(f"Features need one row per example, (N, D) or (N, H, W, C); got shape "
                     f"{features.shape}.")
  return features.reshape(len(features), -1)


def standardizer(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and scale of the training rows (scale 1 for constant features).

  Args:
    train_features: (N, D) features.

  Returns:
    `(mean, scale)`, float32 (D,) each.
  """
  x = np.asarray(train_features, np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0)
  scale = np.where(std > _CONSTANT_STD, std, 1.0)
  return mean.astype(np.float32), scale.astype(np.float32)


def minibatch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """The rows each step trains on: a fresh seeded permutation per epoch.

  Each epoch's remainder (num_examples % batch_size rows) is left out, so
  every batch is full.

  Args:
    num_examples: rows of the train features.
    batch_size: rows per step, 1..num_examples.
    steps: how many steps.
    seed: decides the permutations.

  Returns:
    int32 (steps, batch_size) row indices.
  """
  if not 1 <= batch_size <= num_examples:
    raise ValueError(f"batch_size must be between 1 and the {num_examples} train examples, "
                     f"not {batch_size}.")
  per_epoch = num_examples // batch_size
  epochs = -(-steps // per_epoch)
  rows = [np.random.default_rng([seed, epoch]).permutation(num_examples)[:per_epoch * batch_size]
          for epoch in range(epochs)]
  return np.concatenate(rows)[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
  """Which fold each example belongs to, every class spread evenly over the folds.

  The examples of each class are shuffled (seeded) and dealt to the folds in
  turn, continuing from class to class, so fold sizes differ by at most one
  and each class's count per fold by at most one.

  Args:
    labels: int (N,).
    folds: how many folds, at least 2.
    seed: decides the shuffle.

  Returns:
    int64 (N,), values 0..folds-1.

  Examples:
    >>> stratified_folds(np.array([0, 0, 1, 1, 1]), 2, seed=0)
    array([0, 1, 1, 0, 0])
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, _FOLD_STREAM])
  fold_of = np.empty(len(labels), np.int64)
  dealt = 0
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    fold_of[members] = (dealt + np.arange(len(members))) % folds
    dealt += len(members)
  return fold_of


def fold_count(labels: np.ndarray, folds: int) -> int:
  """`folds`, or fewer when a class has fewer train examples than that.

  Raises:
    ValueError: a class with a single train example (none could be held
      out), or `folds` below 2.
  """
  if int(folds) < 2:
    raise ValueError(f"folds must be at least 2 (one to train on, one to hold out), not {folds}.")
  classes, counts = np.unique(np.asarray(labels), return_counts=True)
  rare = [(int(c), int(n)) for c, n in zip(classes, counts) if n < 2]
  if rare:
    listed = ", ".join(f"class {c} has {n}" for c, n in rare)
    raise ValueError(f"Cross-validation needs at least 2 train examples of every class, to hold "
                     f"one out while training on another, but {listed}. Add train examples of "
                     "it, or drop the class from both splits.")
  return int(min(int(folds), counts.min()))


def head_logits(params, x):
  """`x @ kernel + bias` at full float32 precision (no TF32 on GPUs)."""
  return jnp.dot(x, params["kernel"], precision=jax.lax.Precision.HIGHEST) + params["bias"]


def probe_loss(params, x, labels, weight_decay, weights=None):
  """Mean cross-entropy plus weight_decay / 2 * ||kernel||^2: every head's objective.

  Args:
    params: `{"kernel": (D, K), "bias": (K,)}`.
    x: standardised features (B, D).
    labels: int (B,).
    weight_decay: L2 strength (the bias is not decayed).
    weights: None, or float (B,) of 1 (rows trained on) and 0 (rows left
      out): the mean runs over the rows of weight 1.

  Returns:
    The scalar loss.
  """
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(head_logits(params, x), labels)
  mean = (jnp.mean(cross_entropy) if weights is None
          else jnp.sum(weights * cross_entropy) / jnp.sum(weights))
  return mean + 0.5 * weight_decay * jnp.sum(params["kernel"] ** 2)


def train_head(train_x, train_y, weights, order, learning_rate, weight_decay, num_classes: int,
               steps: int):
  """Trains one head with Adam from zero weights (what the grid vmaps).

  Args:
    train_x: standardised float32 (N, D).
    train_y: int32 (N,).
    weights: float32 (N,): 1 on the rows to train on, 0 on rows held out
      (used by full-batch steps; `order` names only rows to train on).
    order: None for full-batch steps, else int32 (steps, B) rows per step.
    learning_rate: this head's learning rate (a scalar, may be traced).
    weight_decay: this head's weight decay (a scalar, may be traced).
    num_classes: outputs of the head.
    steps: optimizer steps.

  Returns:
    `{"kernel": (D, num_classes), "bias": (num_classes,)}`.
  """
  params = {"kernel": jnp.zeros((train_x.shape[1], num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  optimizer = optax.adam(learning_rate)

  def step(carry, rows):
    params, opt_state = carry
    if rows is None:
      grads = jax.grad(probe_loss)(params, train_x, train_y, weight_decay, weights)
    else:
      grads = jax.grad(probe_loss)(params, train_x[rows], train_y[rows], weight_decay)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), order, length=steps)
  return params


def _right(params, x, labels):
  """Whether the head classifies each row of standardised `x` right (bool (N,))."""
  return jnp.argmax(head_logits(params, x), axis=-1) == labels


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _train_heads(train_x, train_y, weights, order, learning_rates, weight_decays, num_classes,
                 steps):
  """Every head of every fold at once, and which rows each classifies right.

  Args (F folds, G grid points): train_x (F, N, D), each fold's copy
  standardised with its statistics; weights (F, N); order None or
  (F, steps, B); learning_rates, weight_decays (G,).

  Returns:
    params with leading axes (F, G), and bool (F, G, N): the right answers on
    every row, those the fold trained on and those it held out.
  """
  def one_fold(x, w, rows):
    def one_head(learning_rate, weight_decay):
      params = train_head(x, train_y, w, rows, learning_rate, weight_decay, num_classes, steps)
      return params, _right(params, x, train_y)
    return jax.vmap(one_head)(learning_rates, weight_decays)
  return jax.vmap(one_fold)(train_x, weights, order)


def _check_labels(labels, count: int, num_classes: int, split: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or len(labels) != count:
    raise ValueError(f"{split} labels have shape {labels.shape}, but there are {count} "
                     f"{split} feature rows; pass one label per row.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{split} labels must be integers, not {labels.dtype}.")
  if count and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{split} labels run from {labels.min()} to {labels.max()}, outside "
                     f"0..{num_classes - 1} for num_classes={num_classes}.")
  return labels.astype(np.int32)


def _check_grid(values: Sequence[float], name: str, minimum_ok) -> tuple[float, ...]:
  values = tuple(float(v) for v in values)
  if not values:
    raise ValueError(f"{name} is empty; give at least one value.")
  bad = [v for v in values if not (np.isfinite(v) and minimum_ok(v))]
  if bad:
    raise ValueError(f"Bad {name} {bad}.")
  return values


def _checked_inputs(train_x, train_y, others, num_classes, learning_rates, weight_decays,
                    steps):
  """The checks every entry point shares; `others` are (name, x, y) of further splits."""
  train_x = _flatten(train_x)
  if len(train_x) == 0:
    raise ValueError("Need train examples; got none.")
  if int(num_classes) < 2:
    raise ValueError(f"num_classes must be at least 2, not {num_classes}.")
  num_classes = int(num_classes)
  checked = []
  for name, x, y in others:
    x = _flatten(x)
    if len(x) == 0:
      raise ValueError(f"Need {name} examples; got none.")
    if x.shape[1] != train_x.shape[1]:
      raise ValueError(f"Train features have {train_x.shape[1]} values per example but "
                       f"{name} features {x.shape[1]}; extract both the same way.")
    checked += [x, _check_labels(y, len(x), num_classes, name)]
  if not all(np.isfinite(x).all() for x in [train_x] + checked[::2]):
    raise ValueError("The features contain NaN or infinite values.")
  train_y = _check_labels(train_y, len(train_x), num_classes, "train")
  learning_rates = _check_grid(learning_rates, "learning_rates", lambda v: v > 0)
  weight_decays = _check_grid(weight_decays, "weight_decays", lambda v: v >= 0)
  if int(steps) < 1:
    raise ValueError(f"steps must be at least 1, not {steps}.")
  return (train_x, train_y, *checked, num_classes, learning_rates, weight_decays, int(steps))


def _grid_axes(learning_rates, weight_decays) -> tuple[np.ndarray, np.ndarray]:
  """Grid point (i, j) is head i * len(weight_decays) + j."""
  return (np.repeat(np.asarray(learning_rates, np.float32), len(weight_decays)),
          np.tile(np.asarray(weight_decays, np.float32), len(learning_rates)))


def choose(scores: np.ndarray, learning_rates: Sequence[float],
           weight_decays: Sequence[float]) -> tuple[int, int]:
  """The grid point with the highest score; `TIE_RULE` among equals.

  Args:
    scores: (len(learning_rates), len(weight_decays)).
    learning_rates: the grid's first axis (any order).
    weight_decays: the grid's second axis (any order).

  Returns:
    (i, j), by value whatever order the axes are given in.
  """
  # Equal accuracies computed in another order differ in the last bit (a mean
  # of fold accuracies is 0.608...224 or 0.608...225): rounded, they tie as
  # they should. Distinct means of fold accuracies differ by far more than 1e-9.
  rounded = np.round(np.asarray(scores, np.float64), 9)
  best = min(np.ndindex(*scores.shape),
             key=lambda ij: (-rounded[ij], -weight_decays[ij[1]], learning_rates[ij[0]]))
  return tuple(int(i) for i in best)


@dataclasses.dataclass(frozen=True, eq=False)
class CrossValidation:
  """Every grid point trained on k-1 folds and scored on the fold left out.

  Attributes:
    fold_of: int64 (N,), the fold of each train example (`stratified_folds`).
    accuracy: float64 (len(learning_rates), len(weight_decays), folds): each
      point's accuracy on each held-out fold.
    kernels: float32 (len(learning_rates), len(weight_decays), folds, D, K).
    biases: float32 (len(learning_rates), len(weight_decays), folds, K).
    means, scales: float32 (folds, D), each fold's standardisation.
  """
  fold_of: np.ndarray
  accuracy: np.ndarray
  kernels: np.ndarray
  biases: np.ndarray
  means: np.ndarray
  scales: np.ndarray

  @property
  def folds(self) -> int:
    return self.accuracy.shape[-1]

  def head(self, i: int, j: int, fold: int) -> LinearProbe:
    """The head of learning rate `i` and weight decay `j` trained without fold `fold`."""
    return LinearProbe(self.means[fold], self.scales[fold], self.kernels[i, j, fold],
                       self.biases[i, j, fold])


def cross_validate(train_x, train_y, num_classes: int, learning_rates: Sequence[float],
                   weight_decays: Sequence[float], steps: int = 500,
                   batch_size: int | None = None, seed: int = 0,
                   folds: int = DEFAULT_FOLDS) -> CrossValidation:
  """Each grid point's accuracy on each held-out fold of the train features.

  Every fold's heads train on the other folds, standardised with their
  statistics, and are scored on the fold's own rows.

  Args:
    train_x: features (N, ...); flattened per example.
    train_y: int labels (N,), 0..num_classes-1.
    num_classes: outputs of each head (at least 2).
    learning_rates: Adam learning rates (> 0), the rows of the grid.
    weight_decays: L2 strengths (>= 0), the columns of the grid.
    steps: optimizer steps per head.
    batch_size: rows per step; None trains on all of a fold's rows every step.
    seed: deals the folds and orders each fold's minibatches.
    folds: wanted folds; fewer when a class has fewer examples (`fold_count`).

  Returns:
    A `CrossValidation`.

  Examples:
    >>> cv = cross_validate(train_x, train_y, 10, [1e-2, 1e-1], [0.0, 1e-3])
    >>> cv.accuracy.mean(-1)     # mean held-out accuracy per grid point
  """
  (train_x, train_y, num_classes, learning_rates, weight_decays,
   steps) = _checked_inputs(train_x, train_y, [], num_classes, learning_rates, weight_decays,
                            steps)
  folds = fold_count(train_y, folds)
  fold_of = stratified_folds(train_y, folds, seed)
  trained_on = [np.flatnonzero(fold_of != fold) for fold in range(folds)]
  if batch_size is not None:
    fewest = min(len(rows) for rows in trained_on)
    if not 1 <= int(batch_size) <= fewest:
      raise ValueError(f"batch_size must be between 1 and the {fewest} examples a "
                       f"cross-validation fold trains on ({folds} folds of {len(train_x)} "
                       f"train examples), not {batch_size}.")
  statistics = [standardizer(train_x[rows]) for rows in trained_on]
  standardized = np.stack([(train_x - mean) / scale for mean, scale in statistics])
  weights = np.stack([fold_of != fold for fold in range(folds)]).astype(np.float32)
  # Minibatches name a fold's own rows only, in the order `fit` gives them alone.
  order = None if batch_size is None else np.stack(
      [rows[minibatch_order(len(rows), int(batch_size), steps, seed)] for rows in trained_on]
  ).astype(np.int32)
  rates, decays = _grid_axes(learning_rates, weight_decays)
  params, right = _train_heads(standardized, train_y, weights, order, rates, decays,
                               num_classes=num_classes, steps=steps)
  held_out = (weights == 0)[:, None, :]
  accuracy_per_fold = (np.asarray(right) & held_out).sum(-1) / held_out.sum(-1)
  shape = (len(learning_rates), len(weight_decays), folds)

  def by_point(per_fold):  # (folds, grid points, ...) -> (lr, wd, folds, ...)
    per_fold = np.asarray(per_fold)
    return np.moveaxis(per_fold, 0, 1).reshape(*shape, *per_fold.shape[2:])
  return CrossValidation(
      fold_of=fold_of, accuracy=by_point(accuracy_per_fold), kernels=by_point(params["kernel"]),
      biases=by_point(params["bias"]), means=np.stack([m for m, _ in statistics]),
      scales=np.stack([s for _, s in statistics]))


def fit(train_x, train_y, num_classes: int, learning_rate: float, weight_decay: float,
        steps: int = 500, batch_size: int | None = None, seed: int = 0) -> LinearProbe:
  """One head trained on all of `train_x`: the refit of a chosen point.

  Args:
    train_x: as for `cross_validate`.
    train_y: as for `cross_validate`.
    num_classes: as for `cross_validate`.
    learning_rate: the point to train: its learning rate.
    weight_decay: the point to train: its weight decay.
    steps: as for `cross_validate`.
    batch_size: as for `cross_validate`.
    seed: as for `cross_validate`.

  Returns:
    A `LinearProbe` standardised with the statistics of all of `train_x`.

  Examples:
    >>> probe = fit(train_x, train_y, 10, learning_rate=0.01, weight_decay=1e-4)
    >>> accuracy(probe, eval_x, eval_y)
  """
  (train_x, train_y, num_classes, (learning_rate,), (weight_decay,),
   steps) = _checked_inputs(train_x, train_y, [], num_classes, [learning_rate],
                            [weight_decay], steps)
  order = None if batch_size is None else minibatch_order(len(train_x), int(batch_size),
                                                          steps, seed)
  mean, scale = standardizer(train_x)
  x = ((train_x - mean) / scale)[None]
  params, _ = _train_heads(
      x, train_y, np.ones((1, len(train_x)), np.float32),
      None if order is None else order[None], np.asarray([learning_rate], np.float32),
      np.asarray([weight_decay], np.float32), num_classes=num_classes, steps=steps)
  return LinearProbe(mean, scale, np.asarray(params["kernel"][0, 0]),
                     np.asarray(params["bias"][0, 0]))


def edge_warnings(learning_rates: Sequence[float], weight_decays: Sequence[float],
                  chosen_index: tuple[int, int]) -> list[str]:
  """Sentences for a chosen value on the edge of its grid (an axis of one value has none).

  A weight decay of 0 at the bottom is no edge: nothing is weaker than none.

  Returns:
    One sentence per edge, naming the grid and a value to add.
  """
  sentences = []
  for name, values, index, what in (
      ("learning_rates", learning_rates, chosen_index[0], "learning rate"),
      ("weight_decays", weight_decays, chosen_index[1], "weight decay")):
    ordered = sorted(set(values))
    chosen = values[index]
    if len(ordered) < 2:
      continue
    grid = ", ".join(f"{v:g}" for v in values)
    if chosen == ordered[-1]:
      ratio = ordered[-1] / ordered[-2] if ordered[-2] > 0 else 10.0
      sentences.append(
          f"The chosen {what} {chosen:g} is the largest in {name} [{grid}]: a larger one may "
          f"do better. Extend the grid upward, e.g. add {chosen * ratio:g}.")
    elif chosen == ordered[0] and chosen > 0:
      ratio = ordered[1] / ordered[0]
      extra = " or 0" if name == "weight_decays" else ""
      sentences.append(
          f"The chosen {what} {chosen:g} is the smallest in {name} [{grid}]: a smaller one may "
          f"do better. Extend the grid downward, e.g. add {chosen / ratio:g}{extra}.")
  return sentences


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeResult:
  """What `select_and_evaluate` found.

  Attributes:
    learning_rates, weight_decays: the grid axes as given.
    cross_validation: the held-out accuracy of every point on every fold
      (`cross_validation.accuracy`) and the heads behind it.
    chosen_index: (i, j) of the best mean held-out accuracy (`TIE_RULE`).
    probe: the head of the chosen point, trained on all train features.
    train_accuracy: that head's accuracy on the train features.
    eval_accuracy: that head's accuracy on the eval split (None without one),
      measured once, after the choice.
    num_train, num_eval: examples of each split.
    warnings: a chosen value on the edge of its grid, with how to extend it.
    steps, batch_size, seed: how the heads were trained.
  """
  learning_rates: tuple[float, ...]
  weight_decays: tuple[float, ...]
  cross_validation: CrossValidation
  chosen_index: tuple[int, int]
  probe: LinearProbe
  train_accuracy: float
  eval_accuracy: float | None
  num_train: int
  num_eval: int
  warnings: tuple[str, ...]
  steps: int
  batch_size: int | None
  seed: int

  @property
  def folds(self) -> int:
    return self.cross_validation.folds

  @property
  def cv_accuracy(self) -> np.ndarray:
    """Mean held-out accuracy over the folds, per grid point."""
    return self.cross_validation.accuracy.mean(axis=-1)

  @property
  def cv_accuracy_std(self) -> np.ndarray:
    """Sample standard deviation of the held-out accuracy over the folds, per grid point."""
    return self.cross_validation.accuracy.std(axis=-1, ddof=1)

  @property
  def chosen_learning_rate(self) -> float:
    return self.learning_rates[self.chosen_index[0]]

  @property
  def chosen_weight_decay(self) -> float:
    return self.weight_decays[self.chosen_index[1]]


def select_and_evaluate(train_x, train_y, eval_x, eval_y, num_classes: int,
                        learning_rates: Sequence[float], weight_decays: Sequence[float],
                        steps: int = 500, batch_size: int | None = None, seed: int = 0,
                        folds: int = DEFAULT_FOLDS) -> ProbeResult:
  """Chooses a grid point by cross-validation on the train features, refits, tests once.

  The eval split plays no part in the choice: its features and labels are
  used once, to score the chosen head.

  Args:
    train_x: features (N, ...); flattened per example.
    train_y: int labels (N,), 0..num_classes-1; every class present needs at
      least 2 examples.
    eval_x: the features of the split to report, or None for no test.
    eval_y: its labels, or None for no test.
    num_classes: outputs of each head (at least 2).
    learning_rates: Adam learning rates (> 0), the rows of the grid.
    weight_decays: L2 strengths (>= 0), the columns of the grid.
    steps: optimizer steps per head.
    batch_size: rows per step; None trains on all rows every step.
    seed: deals the folds and orders the minibatches; the result is a
      function of the inputs and the seed.
    folds: cross-validation folds (fewer when a class has fewer examples).

  Returns:
    A `ProbeResult`.

  Examples:
    >>> result = select_and_evaluate(train_x, train_y, eval_x, eval_y, 10,
    ...                              [1e-3, 1e-2, 1e-1], [0.0, 1e-4, 1e-3])
    >>> result.cv_accuracy[result.chosen_index], result.eval_accuracy
    (0.953, 0.961)
  """
  others = [] if eval_x is None else [("eval", eval_x, eval_y)]
  checked = _checked_inputs(train_x, train_y, others, num_classes, learning_rates,
                            weight_decays, steps)
  train_x, train_y = checked[:2]
  num_classes, learning_rates, weight_decays, steps = checked[-4:]
  cross_validation = cross_validate(train_x, train_y, num_classes, learning_rates,
                                    weight_decays, steps, batch_size, seed, folds)
  chosen = choose(cross_validation.accuracy.mean(axis=-1), learning_rates, weight_decays)
  warnings = edge_warnings(learning_rates, weight_decays, chosen)
  for sentence in warnings:
    log.warning("%s", sentence)
  probe = fit(train_x, train_y, num_classes, learning_rates[chosen[0]],
              weight_decays[chosen[1]], steps, batch_size, seed)
  # The eval split, once, after the choice.
  eval_accuracy = None if eval_x is None else accuracy(probe, checked[2], checked[3])
  return ProbeResult(
      learning_rates=learning_rates, weight_decays=weight_decays,
      cross_validation=cross_validation, chosen_index=chosen,
      probe=probe, train_accuracy=accuracy(probe, train_x, train_y),
      eval_accuracy=eval_accuracy, num_train=len(train_x),
      num_eval=0 if eval_x is None else len(checked[2]), warnings=tuple(warnings),
      steps=steps, batch_size=None if batch_size is None else int(batch_size), seed=int(seed))


def format_cv_grid(result: ProbeResult) -> str:
  """Every point's cross-validation accuracy, mean ± sd over folds in %, the chosen in bold.

  Rows are learning rates, columns weight decays.

  Examples:
    >>> print(format_cv_grid(result))
    | learning rate \\ weight decay | 0 | 0.0001 |
    |---|---|---|
    | 0.01 | 94.8 ± 1.9 | **95.3 ± 1.2** |
  """
  mean, std = result.cv_accuracy, result.cv_accuracy_std
  lines = ["| learning rate \\ weight decay | "
           + " | ".join(f"{wd:g}" for wd in result.weight_decays) + " |",
           "|---" * (len(result.weight_decays) + 1) + "|"]
  for i, rate in enumerate(result.learning_rates):
    cells = []
    for j in range(len(result.weight_decays)):
      cell = f"{100 * mean[i, j]:.1f} ± {100 * std[i, j]:.1f}"
      cells.append(f"**{cell}**" if (i, j) == result.chosen_index else cell)
    lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def result_summary(result: ProbeResult) -> dict:
  """The JSON-ready record of a probe (what `linear_probe.json` holds)."""
  i, j = result.chosen_index
  return {
      "objective": "mean cross-entropy + weight_decay/2 * ||kernel||^2 on standardised "
                   "features, Adam from zero weights",
      "selection": f"stratified {result.folds}-fold cross-validation on the train features "
                   f"only (the eval split takes no part); the highest mean held-out "
                   f"accuracy, {TIE_RULE}",
      "learning_rates": list(result.learning_rates),
      "weight_decays": list(result.weight_decays),
      "steps": result.steps,
      "batch_size": result.batch_size,
      "seed": result.seed,
      "folds": result.folds,
      "cv_accuracy_mean": result.cv_accuracy.tolist(),
      "cv_accuracy_std": result.cv_accuracy_std.tolist(),
      "chosen": {"learning_rate": result.chosen_learning_rate,
                 "weight_decay": result.chosen_weight_decay,
                 "cv_accuracy_mean": float(result.cv_accuracy[i, j]),
                 "cv_accuracy_std": float(result.cv_accuracy_std[i, j])},
      "refit": {"train_examples": result.num_train,
                "train_accuracy": result.train_accuracy},
      "eval": {"examples": result.num_eval, "accuracy": result.eval_accuracy},
      "warnings": list(result.warnings),
  }
