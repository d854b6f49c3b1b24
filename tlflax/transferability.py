"""Transferability scores: how well a (source network, stage) will transfer, from one pass.

Each score reads what one forward pass over the target data gives, with no
training of the network: the features a stage produces, or the probabilities
of the source network's own classification head, and the target labels.

For every score, higher means better expected transfer:

  score                   reads                  range
  logme                   features               any real (log evidence per example)
  h_score                 features               [0, classes - 1]
  knn_accuracy            features               [0, 1]
  linear_probe_accuracy   features               [0, 1]
  leep                    source_probabilities   (-inf, 0]
  nce                     source_probabilities   [-H(Y), 0]  (their argmax)

LEEP and NCE read the source head, so they exist for the full network only
(its last stage); the others score any stage.

    >>> scores = compute_scores(["logme", "h_score"], features=stage_features, labels=labels)
    >>> value, seconds = scores["logme"]

Pass the target *training* split: the cross-validated accuracies fold only the
rows they are given, and a score computed on the split a result is reported on
leaks it. All arithmetic is numpy in float64.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
from sklearn.base import clone
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# How far a row of source probabilities may sum from 1 (a float32 softmax over
# thousands of classes rounds by ~1e-5) before it is taken for logits.
_PROBABILITY_SUM_TOLERANCE = 1e-3
# LogME's evidence may rise all the way to a boundary of lambda = alpha / beta:
# 0 (beta -> inf, an exact fit, usual when n <= d) or inf (alpha -> inf, the
# features explain nothing of a class). It is flat there, so the iteration
# stops at these bounds (relative to the largest eigenvalue of F^T F) ...
_LOGME_RELATIVE_LAMBDA_BOUNDS = (1e-14, 1e14)
# ... or once no class's evidence per example moves by more than this.
_LOGME_EVIDENCE_TOLERANCE = 1e-10


class TransferabilityError(ValueError):
  """Inputs a transferability score cannot use; the message says what to change."""


def _check_features(features) -> np.ndarray:
  """`features` as a finite float64 (examples, dimensions) array, or an error."""
  array = np.asarray(features, np.float64)
  if array.ndim != 2:
    raise TransferabilityError(
        f"features must be a 2-D array (examples, feature dimensions), got shape "
        f"{array.shape}: pool or flatten a stage's spatial dimensions first.")
  if array.shape[1] == 0:
    raise TransferabilityError("features have no columns: the stage produced no features.")
  finite_rows = np.isfinite(array).all(axis=1)
  if not finite_rows.all():
    raise TransferabilityError(
        f"features contain NaN or inf in {int((~finite_rows).sum())} of {len(array)} rows: "
        "the stage produced non-finite values (check the preprocessing, or a stage that "
        "overflows in float16).")
  return array


def _class_codes(labels, num_examples: int,
                 folds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(codes 0..C-1 in `np.unique` order, counts per class) of labels that fit `num_examples`.

  `folds`, for the cross-validated scores, is how many examples each class needs.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise TransferabilityError(f"labels must be 1-D (one class per example), got shape "
                               f"{labels.shape}: pass class indices, not one-hot rows.")
  if len(labels) != num_examples:
    raise TransferabilityError(f"{len(labels)} labels for {num_examples} rows of inputs: pass "
                               "one label per example, in the same order.")
  classes, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
  if len(classes) < 2:
    raise TransferabilityError(f"the labels hold {len(classes)} class; a transferability score "
                               "needs at least 2 target classes.")
  smallest = int(np.argmin(counts))
  if counts[smallest] < 2:
    raise TransferabilityError(
        f"class {classes[smallest].item()!r} has {counts[smallest]} example; every class "
        "needs at least 2: give more examples of it or leave the class out.")
  if folds is not None and counts[smallest] < folds:
    raise TransferabilityError(
        f"class {classes[smallest].item()!r} has {counts[smallest]} examples, fewer than the "
        f"{folds} folds: lower folds to at most {counts[smallest]} or give more examples of it.")
  return codes.reshape(-1), counts


def _check_probabilities(source_probabilities) -> np.ndarray:
  """Source-head probabilities as float64 rows that sum to 1, or an error."""
  array = np.asarray(source_probabilities, np.float64)
  if array.ndim != 2:
    raise TransferabilityError(f"source_probabilities must be 2-D (examples, source classes), "
                               f"got shape {array.shape}.")
  if not np.isfinite(array).all():
    raise TransferabilityError("source_probabilities contain NaN or inf.")
  if (array < 0).any():
    raise TransferabilityError("source_probabilities has negative entries: pass the softmax of "
                               "the source head's logits, not the logits.")
  sums = array.sum(axis=1)
  if np.abs(sums - 1).max() > _PROBABILITY_SUM_TOLERANCE:
    raise TransferabilityError(
        f"source_probabilities rows must sum to 1, got sums from {sums.min():.4g} to "
        f"{sums.max():.4g}: pass the softmax of the source head's logits.")
  return array / sums[:, None]


def _one_hot(codes: np.ndarray, num_classes: int) -> np.ndarray:
  return np.eye(num_classes)[codes]


class ClassEvidence(NamedTuple):
  """LogME's fit to the one-hot target of one class.

  Attributes:
    log_evidence: log p(y_c | F, alpha, beta), summed over examples (not divided by n).
    alpha: the prior precision of the weights at the maximum.
    beta: the noise precision at the maximum.
  """
  log_evidence: float
  alpha: float
  beta: float


def logme_evidence(features, target, alpha: float, beta: float) -> float:
  """The log evidence of a Bayesian linear model, evaluated directly (the d x d way).

  With weights w ~ N(0, I / alpha) and y = F w + N(0, I / beta),

      A = alpha I + beta F^T F,   m = beta A^-1 F^T y,
      L = n/2 log beta + d/2 log alpha - n/2 log 2 pi
          - beta/2 ||F m - y||^2 - alpha/2 m^T m - 1/2 log|A|.

  `logme_per_class` computes the same quantity from one SVD; this form is the
  reference it is tested against.

  Args:
    features: (n, d) features F.
    target: (n,) target y.
    alpha: prior precision, > 0.
    beta: noise precision, > 0.

  Returns:
    L, the total over the n examples.
  """
  features = _check_features(features)
  target = np.asarray(target, np.float64)
  n, d = features.shape
  matrix = alpha * np.eye(d) + beta * features.T @ features
  mean = beta * np.linalg.solve(matrix, features.T @ target)
  residual = np.sum((features @ mean - target) ** 2)
  _, log_determinant = np.linalg.slogdet(matrix)
  return float(n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
               - beta / 2 * residual - alpha / 2 * mean @ mean - log_determinant / 2)


def logme_per_class(features, labels, tolerance: float = 1e-6,
                    max_iterations: int = 1000) -> list[ClassEvidence]:
  """LogME's maximised evidence for each class's one-hot target.

  One thin SVD F = U diag(sigma) V^T serves every class: with s_i = sigma_i^2,
  z = U^T y and r = min(n, d), MacKay's (1992) fixed-point iteration

      gamma = sum_i beta s_i / (alpha + beta s_i),
      alpha <- gamma / m^T m,     beta <- (n - gamma) / ||F m - y||^2,
      m^T m = sum_i (beta sigma_i z_i / (alpha + beta s_i))^2,
      ||F m - y||^2 = sum_i (alpha z_i / (alpha + beta s_i))^2 + ||y - U z||^2,

  runs from alpha = beta = 1 (as in the paper) until alpha and beta change by
  less than `tolerance` (relative). The evidence is that of `logme_evidence`,
  with log|A| = sum_i log(alpha + beta s_i) + (d - r) log alpha. The iteration
  finds a local maximum; where the evidence keeps rising to lambda = alpha /
  beta -> 0 or -> inf it stops at a bound where it has levelled off.

  Args:
    features: (n, d) features; any n and d.
    labels: (n,) target classes.
    tolerance: relative change of alpha and beta that ends the iteration.
    max_iterations: past this, the last iterate is used and a warning given.

  Returns:
    One `ClassEvidence` per class, in the order of `np.unique(labels)`.
  """
  features = _check_features(features)
  codes, counts = _class_codes(labels, len(features))
  n, d = features.shape
  targets = _one_hot(codes, len(counts))  # (n, C)
  u, sigma, _ = np.linalg.svd(features, full_matrices=False)
  if sigma[0] == 0:
    raise TransferabilityError("features are all zero: the stage carries no signal to score.")
  sigma = sigma[:, None]  # (r, 1), against (r, C) per-class arrays
  projected = u.T @ targets  # z of every class
  outside = np.sum((targets - u @ projected) ** 2, axis=0)  # ||y - U z||^2
  lambda_min, lambda_max = np.multiply(_LOGME_RELATIVE_LAMBDA_BOUNDS, sigma.max() ** 2)
  tiny = np.finfo(np.float64).tiny

  def fit(alpha, beta):
    """(gamma, n - gamma, m^T m, ||F m - y||^2, evidence) of every class."""
    denominator = alpha + beta * sigma ** 2  # eigenvalues of A
    gamma = np.sum(beta * sigma ** 2 / denominator, axis=0)
    # n - gamma from its own terms: no cancellation when beta s_i >> alpha.
    n_minus_gamma = n - len(sigma) + np.sum(alpha / denominator, axis=0)
    weight_norm = np.sum((beta * sigma * projected / denominator) ** 2, axis=0)
    residual = np.sum((alpha * projected / denominator) ** 2, axis=0) + outside
    log_determinant = np.sum(np.log(denominator), axis=0) + (d - len(sigma)) * np.log(alpha)
    evidence = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                - beta / 2 * residual - alpha / 2 * weight_norm - log_determinant / 2)
    return gamma, n_minus_gamma, weight_norm, residual, evidence

  alpha, beta = np.ones(len(counts)), np.ones(len(counts))
  gamma, n_minus_gamma, weight_norm, residual, evidence = fit(alpha, beta)
  for _ in range(max_iterations):
    new_beta = n_minus_gamma / np.maximum(residual, tiny)
    with np.errstate(over="ignore"):  # an infinite lambda is clipped to its bound
      new_lambda = np.clip(gamma / np.maximum(weight_norm, tiny) / new_beta, lambda_min,
                           lambda_max)
    at_bound = (new_lambda == lambda_min) | (new_lambda == lambda_max)
    if at_bound.any():
      # m depends on lambda alone; for a fixed lambda the evidence peaks at
      # beta = n / (||F m - y||^2 + lambda m^T m), which the update misses.
      _, _, bound_weight_norm, bound_residual, _ = fit(new_lambda, np.ones_like(beta))
      new_beta = np.where(at_bound, n / (bound_residual + new_lambda * bound_weight_norm),
                          new_beta)
    new_alpha = new_lambda * new_beta
    change = max(np.max(np.abs(new_alpha / alpha - 1)), np.max(np.abs(new_beta / beta - 1)))
    previous = evidence
    alpha, beta = new_alpha, new_beta
    gamma, n_minus_gamma, weight_norm, residual, evidence = fit(alpha, beta)
    if change < tolerance or np.max(np.abs(evidence - previous)) / n < _LOGME_EVIDENCE_TOLERANCE:
      break
  else:
    warnings.warn(f"LogME's fixed-point iteration did not converge in {max_iterations} "
                  f"iterations (last relative change {change:.2g}); the score is approximate.",
                  RuntimeWarning, stacklevel=2)
  return [ClassEvidence(float(e), float(a), float(b)) for e, a, b in zip(evidence, alpha, beta)]


def logme(features, labels) -> float:
  """LogME: the maximised log evidence of a linear model from features to one-hot labels.

  You, Liu, Wang, Long (ICML 2021), "LogME: Practical Assessment of
  Pre-trained Models for Transfer Learning". For each class c, a Bayesian
  linear regression from the features F (n x d, used as given: not centred or
  standardised, as in the paper) to the one-hot target y_c, with the prior
  precision alpha and noise precision beta that maximise its evidence
  (see `logme_evidence` and `logme_per_class`):

      LogME = 1/C sum_c max_{alpha, beta} L_c(alpha, beta) / n.

  Higher is better: the features explain the labels linearly with more evidence.
  Invariant to the order of the examples and to an orthogonal rotation of the
  features (hence to a permutation of their columns).

  Args:
    features: (n, d) features of the target data; n < d and n > d both work.
    labels: (n,) target classes.

  Returns:
    The mean over classes of the log evidence per example.
  """
  per_class = logme_per_class(features, labels)
  return float(np.mean([fit.log_evidence for fit in per_class]) / len(features))


def leep(source_probabilities, labels) -> float:
  """LEEP: the log-likelihood of the labels under the source head and an empirical relabelling.

  Nguyen, Hassner, Seeger, Archambeau (ICML 2020), "LEEP: A New Measure to
  Evaluate Transferability of Learned Representations". With theta_i = p(z | x_i)
  the source head's probabilities over source classes z,

      P(y, z) = 1/n sum_i theta_iz 1[y_i = y],   P(y | z) = P(y, z) / P(z),
      LEEP = 1/n sum_i log sum_z P(y_i | z) theta_iz.

  Higher is better; at most 0, reached when the source classes name the
  target classes exactly (one-hot probabilities, target a function of the
  source class). Uninformative (uniform) probabilities give sum_y p(y) log p(y).

  Args:
    source_probabilities: (n, Z) softmax outputs of the source head, rows
      summing to 1 (to 1e-3; they are renormalised).
    labels: (n,) target classes.

  Returns:
    The mean log-likelihood, <= 0.
  """
  probabilities = _check_probabilities(source_probabilities)
  codes, counts = _class_codes(labels, len(probabilities))
  joint = _one_hot(codes, len(counts)).T @ probabilities / len(probabilities)  # (C, Z)
  source_marginal = joint.sum(axis=0)
  # A source class no example gives mass to drops out (its theta_iz are all 0).
  conditional = np.divide(joint, source_marginal, out=np.zeros_like(joint),
                          where=source_marginal > 0)
  likelihood = np.sum(probabilities * conditional[codes], axis=1)
  return float(np.mean(np.log(likelihood)))


def nce(source_labels, labels) -> float:
  """NCE: the negative conditional entropy of the target labels given the source labels.

  Tran, Nguyen, Hassner (ICCV 2019), "Transferability and Hardness of
  Supervised Classification Tasks". From the empirical joint P(y, z) of the
  target labels y and the hard source labels z (the argmax of the source head),

      NCE = -H(Y | Z) = sum_{y, z} P(y, z) log (P(y, z) / P(z)).

  Higher is better; at most 0, reached when y is a function of z. A constant
  z gives -H(Y), the minimum.

  Args:
    source_labels: (n,) source class of each example (argmax of the source head).
    labels: (n,) target classes.

  Returns:
    -H(Y | Z) in nats.
  """
  source_labels = np.asarray(source_labels)
  if source_labels.ndim != 1:
    raise TransferabilityError(f"source_labels must be 1-D, got shape {source_labels.shape}: "
                               "pass the argmax of the source head's probabilities.")
  codes, counts = _class_codes(labels, len(source_labels))
  _, source_codes = np.unique(source_labels, return_inverse=True)
  joint = np.zeros((len(counts), source_codes.max() + 1))
  np.add.at(joint, (codes, source_codes.reshape(-1)), 1.0 / len(codes))
  conditional = joint / joint.sum(axis=0)
  present = joint > 0
  return float(np.sum(joint[present] * np.log(conditional[present])))


def h_score(features, labels, shrinkage: float | None = None) -> float:
  """H-score: how much of the features' variance lies between the class means.

  Bao, Li, Huang, Zheng, Wang, Tao, Guo (ICIP 2019), "An Information-Theoretic
  Approach to Transferability in Task Transfer Learning":

      H = tr(cov(f)^-1 cov(E[f | y])),

  with the regularised covariance of Ibrahim, Ponomareva, Mazumder (2022),
  "Newer is not always better: rethinking transferability metrics, their
  peculiarities, stability and performance":

      H_a = tr(cov_a(f)^-1 (1 - a) cov(E[f | y])),
      cov_a(f) = (1 - a) cov(f) + a (tr cov(f) / d) I.

  Covariances are the 1/n (maximum-likelihood) ones; cov(f) = within + between,
  so 0 <= H_a <= C - 1. Higher is better. With a = 0 the score is invariant to
  any invertible affine map of the features; with a > 0 only to a scaling,
  rotation and shift (the shrinkage target a multiple of I is not kept by
  other maps).

  Args:
    features: (n, d) features.
    labels: (n,) target classes.
    shrinkage: a in [0, 1]; None (the default) takes the Ledoit-Wolf estimate
      (sklearn's `ledoit_wolf_shrinkage`), 0 the original H-score (with a
      pseudo-inverse where cov(f) is singular, e.g. n <= d).

  Returns:
    The H-score.
  """
  features = _check_features(features)
  codes, counts = _class_codes(labels, len(features))
  n, d = features.shape
  centred = features - features.mean(axis=0)
  covariance = centred.T @ centred / n
  class_means = _one_hot(codes, len(counts)).T @ centred / counts[:, None]  # (C, d)
  between = class_means.T @ (class_means * (counts / n)[:, None])
  if shrinkage is None:
    shrinkage = float(ledoit_wolf_shrinkage(centred, assume_centered=True))
  elif not 0 <= shrinkage <= 1:
    raise TransferabilityError(f"shrinkage must lie in [0, 1] (or be None for Ledoit-Wolf), "
                               f"got {shrinkage}.")
  average_variance = np.trace(covariance) / d
  if average_variance == 0:
    return 0.0  # constant features: nothing lies between the class means
  regularised = (1 - shrinkage) * covariance + shrinkage * average_variance * np.eye(d)
  inverse = np.linalg.pinv(regularised, hermitian=True)
  return float(np.sum(inverse * ((1 - shrinkage) * between)))  # tr(P B), both symmetric


def _canonical_order(features: np.ndarray, codes: np.ndarray) -> np.ndarray:
  """An order of the rows fixed by their contents, whatever order they came in.

  By class, then by a random projection of the row's sorted values (unchanged
  by a permutation of the columns), then by one of the row itself (ties). Each
  key reduces along its own row only, so it is bitwise the same wherever the
  row sits.
  """
  directions = np.random.default_rng(0).standard_normal((2, features.shape[1]))
  sorted_key = np.sum(np.sort(features, axis=1) * directions[0], axis=1)
  row_key = np.sum(features * directions[1], axis=1)
  return np.lexsort((row_key, sorted_key, codes))


def _cross_validated_accuracy(classifier, features, labels, folds: int, seed: int,
                              min_train_rows: int = 1) -> float:
  """Held-out accuracy, pooled over stratified folds, of standardisation + `classifier`.

  The folds are drawn (shuffled with `seed`) over the rows in `_canonical_order`,
  so the score does not depend on the order of the examples; the scaler is
  fitted on each training part only.
  """
  features = _check_features(features)
  if not isinstance(folds, (int, np.integer)) or folds < 2:
    raise TransferabilityError(f"folds must be an integer >= 2, got {folds!r}.")
  codes, _ = _class_codes(labels, len(features), folds=folds)
  order = _canonical_order(features, codes)
  features, codes = features[order], codes[order]
  splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
                .split(features, codes))
  fewest = min(len(train) for train, _ in splits)
  if fewest < min_train_rows:
    raise TransferabilityError(f"a training fold has {fewest} rows, fewer than the "
                               f"{min_train_rows} the classifier needs: lower k or folds, or "
                               "give more examples.")
  correct = 0
  for train, test in splits:
    model = make_pipeline(StandardScaler(), clone(classifier))
    model.fit(features[train], codes[train])
    correct += int(np.sum(model.predict(features[test]) == codes[test]))
  return correct / len(codes)


def knn_accuracy(features, labels, k: int = 5, folds: int = 5, seed: int = 0) -> float:
  """Cross-validated k-nearest-neighbour accuracy (Euclidean, standardised features).

  Each held-out example takes the majority class of its k nearest training
  examples by Euclidean distance, after every feature is standardised with
  the training folds' mean and variance (vote ties go to the lower class).
  Folds are stratified, shuffled with `seed`, and do not depend on the order
  of the examples. Higher is better.

  The folds are made of the rows passed in only: pass the target training
  split, never the split a result is reported on.

      >>> knn_accuracy(train_features, train_labels, k=5, folds=5)

  Args:
    features: (n, d) features.
    labels: (n,) target classes; every class needs at least `folds` examples.
    k: neighbours per vote; at most the rows of a training part.
    folds: number of stratified folds.
    seed: seeds the assignment of examples to folds.

  Returns:
    The held-out accuracy pooled over the folds, in [0, 1].
  """
  return _cross_validated_accuracy(KNeighborsClassifier(n_neighbors=k, metric="euclidean"),
                                   features, labels, folds, seed, min_train_rows=k)


def linear_probe_accuracy(features, labels, folds: int = 5, seed: int = 0,
                          inverse_regularisation: float = 1.0) -> float:
  """Cross-validated accuracy of multinomial logistic regression on standardised features.

  sklearn's `LogisticRegression` (L2 penalty, lbfgs, multinomial loss, up to
  1000 iterations) with a fixed C = `inverse_regularisation` and no inner
  search, on features standardised with the training folds' statistics.
  Folds are stratified, shuffled with `seed`, and do not depend on the order
  of the examples. Higher is better.

  The folds are made of the rows passed in only: pass the target training
  split, never the split a result is reported on.

  Args:
    features: (n, d) features.
    labels: (n,) target classes; every class needs at least `folds` examples.
    folds: number of stratified folds.
    seed: seeds the assignment of examples to folds.
    inverse_regularisation: sklearn's C (larger: weaker L2 penalty).

  Returns:
    The held-out accuracy pooled over the folds, in [0, 1].
  """
  return _cross_validated_accuracy(
      LogisticRegression(C=inverse_regularisation, max_iter=1000), features, labels, folds, seed)


@dataclasses.dataclass(frozen=True)
class ScoreInfo:
  """One entry of `SCORES`.

  Attributes:
    needs: "features" (any stage) or "source_probabilities" (the full network's head).
    description: one line on what it measures.
    function: called as `function(inputs, labels, **options)`.
  """
  needs: str
  description: str
  function: Callable[..., float]


def _nce_from_probabilities(source_probabilities, labels) -> float:
  probabilities = _check_probabilities(source_probabilities)
  return nce(np.argmax(probabilities, axis=1), labels)


SCORES: dict[str, ScoreInfo] = {
    "logme": ScoreInfo("features", "LogME, log evidence per example of a linear model", logme),
    "h_score": ScoreInfo("features", "H-score with Ledoit-Wolf shrinkage", h_score),
    "knn_accuracy": ScoreInfo("features", "cross-validated k-NN accuracy", knn_accuracy),
    "linear_probe_accuracy": ScoreInfo(
        "features", "cross-validated logistic-regression accuracy", linear_probe_accuracy),
    "leep": ScoreInfo("source_probabilities", "LEEP, log-likelihood under the source head",
                      leep),
    "nce": ScoreInfo("source_probabilities",
                     "negative conditional entropy of labels given the source argmax",
                     _nce_from_probabilities),
}


def compute_scores(names: Sequence[str], features=None, labels=None, source_probabilities=None,
                   options: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> dict[str, tuple[float, float]]:
  """Computes the named scores and times each.

  Every name is checked against its inputs before any score runs.

  Args:
    names: keys of `SCORES`.
    features: (n, d) features of the stage, for the scores that need "features".
    labels: (n,) target classes (required).
    source_probabilities: (n, Z) softmax of the full network's source head,
      for "leep" and "nce".
    options: score name -> keyword arguments, e.g. `{"knn_accuracy": {"k": 10}}`.

  Returns:
    name -> (value, seconds it took), in the order of `names`.

  Raises:
    TransferabilityError: an unknown name, missing inputs, or inputs a score cannot use.
  """
  if labels is None:
    raise TransferabilityError("compute_scores needs labels: the target class of every example.")
  options = dict(options or {})
  for name in names:
    if name not in SCORES:
      close = difflib.get_close_matches(str(name), SCORES, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise TransferabilityError(f"unknown score {name!r}{hint}; known: {', '.join(SCORES)}.")
    needs = SCORES[name].needs
    if needs == "features" and features is None:
      raise TransferabilityError(f"{name} needs features: pass the stage's (examples, "
                                 "dimensions) features.")
    if needs == "source_probabilities" and source_probabilities is None:
      raise TransferabilityError(
          f"{name} needs source_probabilities: the full network's source-head probabilities "
          "(softmax over the source classes), which exist for the last stage only. For an "
          "intermediate stage use a features score: "
          + ", ".join(n for n, info in SCORES.items() if info.needs == "features") + ".")
  inputs = {"features": features, "source_probabilities": source_probabilities}
  results = {}
  for name in names:
    info = SCORES[name]
    start = time.perf_counter()
    value = info.function(inputs[info.needs], labels, **options.get(name, {}))
    results[name] = (float(value), time.perf_counter() - start)
  return results
