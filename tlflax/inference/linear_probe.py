"""Linear probes on cached features: a grid of softmax heads trained at once.

    python -m tlflax.cli.linear_probe --features features/digits \\
        --learning_rates 1e-3,1e-2,1e-1 --weight_decays 0,1e-4,1e-3 --steps 500

reads what `python -m tlflax.cli.features` wrote, fits one linear softmax head per
(learning rate, weight decay) pair on the train split, scores each on the eval
split, prints both accuracy grids and the best point, and writes
`DIR/linear_probe.json`.

Every head minimises the same objective, L2-regularised multinomial logistic
regression on standardised features (mean 0, variance 1 per feature, with the
train split's statistics):

    mean cross-entropy + weight_decay / 2 * ||kernel||^2      (the bias is not decayed)

with Adam at the head's learning rate from zero weights. All heads train
together: the per-head step is `jax.vmap`-ed over the grid inside one
`jax.jit`, and minibatches (if any) come in one seeded order shared by every
head, so a grid point gives the numbers it would give trained alone.

The best point is chosen by validation (eval split) accuracy; ties go to the
smaller weight decay, then the smaller learning rate. The eval split both
chooses and scores, so the best accuracy is slightly optimistic; hold out a
validation part of the train split for an unbiased test number.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

RESULT_FILE = "linear_probe.json"
# Features whose train standard deviation is below this are constant: left unscaled.
_CONSTANT_STD = 1e-8


@dataclasses.dataclass(frozen=True, eq=False)
class LinearProbe:
  """One trained head with the standardisation it expects.

  `logits(x) = ((x - mean) / scale) @ kernel + bias`, x flattened per example.

  Attributes:
    mean, scale: float32 (D,), the train split's per-feature statistics.
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

  Example:
    >>> accuracy(result.best, val_x, val_y)
    0.9722
  """
  labels = np.asarray(labels)
  if len(features) != len(labels) or len(labels) == 0:
    raise ValueError(f"Need as many labels as features, at least one: {len(features)} "
                     f"features, {len(labels)} labels.")
  return float(np.mean(probe.predict(features) == labels))


@dataclasses.dataclass(frozen=True, eq=False)
class GridResult:
  """What `fit_grid` found: accuracies of every grid point and its heads.

  Attributes:
    learning_rates, weight_decays: the grid axes as given.
    val_accuracy, train_accuracy: float (len(learning_rates), len(weight_decays)).
    kernels: float32 (len(learning_rates), len(weight_decays), D, num_classes).
    biases: float32 (len(learning_rates), len(weight_decays), num_classes).
    best_index: (i, j) of the best point: highest validation accuracy, ties
      to the smaller weight decay, then the smaller learning rate.
    mean, scale: the standardisation every head shares.
    steps, batch_size: how the heads were trained (batch_size None = full batch).
  """
  learning_rates: tuple[float, ...]
  weight_decays: tuple[float, ...]
  val_accuracy: np.ndarray
  train_accuracy: np.ndarray
  kernels: np.ndarray
  biases: np.ndarray
  best_index: tuple[int, int]
  mean: np.ndarray
  scale: np.ndarray
  steps: int
  batch_size: int | None

  @property
  def best_learning_rate(self) -> float:
    return self.learning_rates[self.best_index[0]]

  @property
  def best_weight_decay(self) -> float:
    return self.weight_decays[self.best_index[1]]

  @property
  def best_val_accuracy(self) -> float:
    return float(self.val_accuracy[self.best_index])

  def probe(self, i: int, j: int) -> LinearProbe:
    """The head of learning rate `i` and weight decay `j`."""
    return LinearProbe(self.mean, self.scale, self.kernels[i, j], self.biases[i, j])

  @property
  def best(self) -> LinearProbe:
    """The best point's head."""
    return self.probe(*self.best_index)


def _flatten(features) -> np.ndarray:
  features = np.asarray(features, np.float32)
  if features.ndim < 2:
    raise ValueError(f"Features need one row per example, (N, D) or (N, H, W, C); got shape "
                     f"{features.shape}.")
  return features.reshape(len(features), -1)


def standardizer(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and scale of the train split (scale 1 for constant features).

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


def head_logits(params, x):
  """`x @ kernel + bias` at full float32 precision (no TF32 on GPUs)."""
  return jnp.dot(x, params["kernel"], precision=jax.lax.Precision.HIGHEST) + params["bias"]


def probe_loss(params, x, labels, weight_decay):
  """Mean cross-entropy plus weight_decay / 2 * ||kernel||^2: every head's objective.

  Args:
    params: `{"kernel": (D, K), "bias": (K,)}`.
    x: standardised features (B, D).
    labels: int (B,).
    weight_decay: L2 strength (the bias is not decayed).

  Returns:
    The scalar loss.
  """
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(head_logits(params, x), labels)
  return jnp.mean(cross_entropy) + 0.5 * weight_decay * jnp.sum(params["kernel"] ** 2)


def train_head(train_x, train_y, order, learning_rate, weight_decay, num_classes: int,
               steps: int):
  """Trains one head with Adam from zero weights (what `fit_grid` vmaps).

  Args:
    train_x: standardised float32 (N, D).
    train_y: int32 (N,).
    order: None for full-batch steps, else int32 (steps, B) rows per step.
    learning_rate, weight_decay: this head's settings (scalars, may be traced).
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
    x, y = (train_x, train_y) if rows is None else (train_x[rows], train_y[rows])
    grads = jax.grad(probe_loss)(params, x, y, weight_decay)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), order, length=steps)
  return params


def correct_count(params, x, labels):
  """How many rows of standardised `x` the head classifies right (int32)."""
  return jnp.sum(jnp.argmax(head_logits(params, x), axis=-1) == labels)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _train_grid(train_x, train_y, val_x, val_y, order, learning_rates, weight_decays,
                num_classes, steps):
  """Every head at once: train, then count right answers on both splits."""
  def one_head(learning_rate, weight_decay):
    params = train_head(train_x, train_y, order, learning_rate, weight_decay, num_classes, steps)
    return params, correct_count(params, train_x, train_y), correct_count(params, val_x, val_y)
  return jax.vmap(one_head)(learning_rates, weight_decays)


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


def fit_grid(train_x, train_y, val_x, val_y, num_classes: int,
             learning_rates: Sequence[float], weight_decays: Sequence[float],
             steps: int = 500, batch_size: int | None = None, seed: int = 0) -> GridResult:
  """Trains one linear softmax head per (learning rate, weight decay) pair.

  Args:
    train_x: features (N, ...) to fit on; flattened per example.
    train_y: int labels (N,), 0..num_classes-1.
    val_x, val_y: features and labels to choose the best point on.
    num_classes: outputs of each head (at least 2).
    learning_rates: Adam learning rates (> 0), the rows of the grid.
    weight_decays: L2 strengths (>= 0), the columns of the grid.
    steps: optimizer steps per head.
    batch_size: rows per step; None trains on the whole train split every step.
    seed: decides the minibatch order (unused for full batches).

  Returns:
    A `GridResult`; `result.best` is the best head, `result.best_index` its
    place in the grid.

  Example:
    >>> result = fit_grid(train_x, train_y, val_x, val_y, 10,
    ...                   learning_rates=[1e-2, 1e-1], weight_decays=[0.0, 1e-3])
    >>> result.best_learning_rate, result.best_val_accuracy
    (0.1, 0.97)
  """
  train_x, val_x = _flatten(train_x), _flatten(val_x)
  if len(train_x) == 0 or len(val_x) == 0:
    raise ValueError(f"Need train and validation examples; got {len(train_x)} and "
                     f"{len(val_x)}.")
  if train_x.shape[1] != val_x.shape[1]:
    raise ValueError(f"Train features have {train_x.shape[1]} values per example but "
                     f"validation features {val_x.shape[1]}; extract both the same way.")
  if not (np.isfinite(train_x).all() and np.isfinite(val_x).all()):
    raise ValueError("The features contain NaN or infinite values.")
  if int(num_classes) < 2:
    raise ValueError(f"num_classes must be at least 2, not {num_classes}.")
  num_classes = int(num_classes)
  train_y = _check_labels(train_y, len(train_x), num_classes, "train")
  val_y = _check_labels(val_y, len(val_x), num_classes, "validation")
  learning_rates = _check_grid(learning_rates, "learning_rates", lambda v: v > 0)
  weight_decays = _check_grid(weight_decays, "weight_decays", lambda v: v >= 0)
  if int(steps) < 1:
    raise ValueError(f"steps must be at least 1, not {steps}.")
  steps = int(steps)
  order = None if batch_size is None else minibatch_order(len(train_x), int(batch_size),
                                                          steps, seed)

  mean, scale = standardizer(train_x)
  # Grid point (i, j) is head i * len(weight_decays) + j.
  rates = np.repeat(np.asarray(learning_rates, np.float32), len(weight_decays))
  decays = np.tile(np.asarray(weight_decays, np.float32), len(learning_rates))
  params, train_correct, val_correct = _train_grid(
      (train_x - mean) / scale, train_y, (val_x - mean) / scale, val_y, order, rates, decays,
      num_classes=num_classes, steps=steps)

  shape = (len(learning_rates), len(weight_decays))
  val_correct = np.asarray(val_correct).reshape(shape)
  # Most right answers first; ties to the smaller weight decay, then learning rate.
  best = min(np.ndindex(*shape),
             key=lambda ij: (-val_correct[ij], weight_decays[ij[1]], learning_rates[ij[0]]))
  return GridResult(
      learning_rates=learning_rates, weight_decays=weight_decays,
      val_accuracy=val_correct / len(val_x),
      train_accuracy=np.asarray(train_correct).reshape(shape) / len(train_x),
      kernels=np.asarray(params["kernel"]).reshape(*shape, *params["kernel"].shape[1:]),
      biases=np.asarray(params["bias"]).reshape(*shape, num_classes),
      best_index=tuple(int(i) for i in best), mean=mean, scale=scale, steps=steps,
      batch_size=None if batch_size is None else int(batch_size))


def format_grid(result: GridResult, metric: str = "val_accuracy") -> str:
  """A markdown table of one accuracy grid, in percent, the best point in bold.

  Args:
    result: from `fit_grid`.
    metric: "val_accuracy" or "train_accuracy".

  Returns:
    Rows are learning rates, columns weight decays.

  Example:
    >>> print(format_grid(result))
    | learning rate \\ weight decay | 0 | 0.0001 |
    |---|---|---|
    | 0.01 | 95.0 | **96.1** |
  """
  if metric not in ("val_accuracy", "train_accuracy"):
    raise ValueError(f"metric must be 'val_accuracy' or 'train_accuracy', not {metric!r}.")
  values = getattr(result, metric)
  lines = ["| learning rate \\ weight decay | "
           + " | ".join(f"{wd:g}" for wd in result.weight_decays) + " |",
           "|---" * (len(result.weight_decays) + 1) + "|"]
  for i, rate in enumerate(result.learning_rates):
    cells = []
    for j in range(len(result.weight_decays)):
      cell = f"{100 * values[i, j]:.1f}"
      cells.append(f"**{cell}**" if (i, j) == result.best_index else cell)
    lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def result_summary(result: GridResult) -> dict:
  """The JSON-ready record of a grid (what `linear_probe.json` holds)."""
  return {
      "objective": "mean cross-entropy + weight_decay/2 * ||kernel||^2 on standardised "
                   "features, Adam from zero weights",
      "learning_rates": list(result.learning_rates),
      "weight_decays": list(result.weight_decays),
      "steps": result.steps,
      "batch_size": result.batch_size,
      "val_accuracy": result.val_accuracy.tolist(),
      "train_accuracy": result.train_accuracy.tolist(),
      "best": {"learning_rate": result.best_learning_rate,
               "weight_decay": result.best_weight_decay,
               "val_accuracy": result.best_val_accuracy,
               "train_accuracy": float(result.train_accuracy[result.best_index])},
  }
