"""Transferability scores (transferability.py): each formula against an independent
evaluation, the exact values the papers state, invariances, and the errors a user meets."""

import warnings

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.covariance import LedoitWolf

from tlflax import transferability
from tlflax.transferability import TransferabilityError

SEEDS = range(4)


def separated_features(seed, num_classes=3, per_class=20, dim=6):
  """Tight clusters around far-apart class centres: any sensible score finds the classes."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), per_class)
  centres = 10.0 * np.eye(num_classes, dim)
  return centres[labels] + 0.5 * rng.standard_normal((len(labels), dim)), labels


def noise_features(seed, num_classes=3, per_class=20, dim=6):
  """Features drawn independently of the labels."""
  rng = np.random.default_rng(1000 + seed)
  labels = np.repeat(np.arange(num_classes), per_class)
  return rng.standard_normal((len(labels), dim)), labels


def interior_logme_data(num_examples, dim, seed, num_classes=3):
  """Features with decaying column scales and a class signal in the first columns.

  For these shapes and seeds LogME's evidence peaks inside (alpha, beta) for
  every class (checked below), so the maximum can be tested by perturbation.
  """
  rng = np.random.default_rng(seed)
  labels = np.arange(num_examples) % num_classes
  features = rng.standard_normal((num_examples, dim)) * 0.8 ** np.arange(dim)
  features[:, :num_classes] += np.eye(num_classes)[labels]
  return features, labels


def random_rotation(dim, seed):
  q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
  return q * np.sign(np.diag(r))


# --- scores separate informative features from noise --------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_separated_features_beat_noise(seed):
  good, labels = separated_features(seed)
  bad, noise_labels = noise_features(seed)
  assert np.array_equal(labels, noise_labels)
  # Margins far above any rounding: the scores differ by whole units.
  assert transferability.logme(good, labels) > transferability.logme(bad, labels) + 0.5
  assert transferability.h_score(good, labels) > transferability.h_score(bad, labels) + 1.0
  # 60 examples, 3 classes: chance is 1/3 (sd of the accuracy ~0.06).
  assert transferability.knn_accuracy(good, labels) == 1.0
  assert transferability.knn_accuracy(bad, labels) < 0.6
  assert transferability.linear_probe_accuracy(good, labels) == 1.0
  assert transferability.linear_probe_accuracy(bad, labels) < 0.6


# --- LogME ---------------------------------------------------------------------------

def test_logme_evidence_is_the_gaussian_marginal_likelihood():
  """The direct evidence formula equals log N(y; 0, F F^T / alpha + I / beta)."""
  rng = np.random.default_rng(0)
  for num_examples, dim in [(8, 5), (5, 8)]:
    features = rng.standard_normal((num_examples, dim))
    target = rng.standard_normal(num_examples)
    for alpha, beta in [(2.0, 3.0), (0.1, 40.0)]:
      covariance = features @ features.T / alpha + np.eye(num_examples) / beta
      expected = multivariate_normal(np.zeros(num_examples), covariance).logpdf(target)
      assert transferability.logme_evidence(features, target, alpha, beta) == pytest.approx(
          expected, rel=1e-10)


@pytest.mark.parametrize("num_examples, dim, seed",
                         [(24, 40, 0), (24, 40, 1), (30, 60, 2), (200, 10, 0)])
def test_logme_reaches_the_maximum_of_the_direct_evidence(num_examples, dim, seed):
  """n < d and n > d: the SVD evidence equals the d x d evaluation, at a local maximum."""
  features, labels = interior_logme_data(num_examples, dim, seed)
  fits = transferability.logme_per_class(features, labels)
  assert len(fits) == 3
  for label, fit in enumerate(fits):
    target = (labels == label).astype(np.float64)
    direct = transferability.logme_evidence(features, target, fit.alpha, fit.beta)
    # float64 with condition numbers ~1e3: agreement to ~1e-13; 1e-8 leaves room.
    assert fit.log_evidence == pytest.approx(direct, rel=1e-8)
    # A 1% move lowers the evidence by ~1e-5; rounding is ~1e-13.
    for alpha_factor, beta_factor in [(1.01, 1), (0.99, 1), (1, 1.01), (1, 0.99)]:
      moved = transferability.logme_evidence(features, target, fit.alpha * alpha_factor,
                                             fit.beta * beta_factor)
      assert moved < direct - 1e-7
  expected = np.mean([fit.log_evidence for fit in fits]) / num_examples
  assert transferability.logme(features, labels) == pytest.approx(expected, rel=1e-12)


def test_logme_at_a_boundary_supremum_converges_without_warning():
  """With n < d the evidence can rise all the way to beta -> infinity (an exact fit).

  The iteration must stop there, without a warning, at an evidence above every
  interior point of a grid.
  """
  rng = np.random.default_rng(0)
  labels = np.arange(12) % 3
  features = rng.standard_normal((12, 30)) + 2 * rng.standard_normal((3, 30))[labels]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fits = transferability.logme_per_class(features, labels)
  grid = [(alpha, beta) for alpha in np.logspace(-2, 4, 7) for beta in np.logspace(-1, 5, 7)]
  for label, fit in enumerate(fits):
    assert fit.beta > 1e8  # at the boundary, not at an interior point
    target = (labels == label).astype(np.float64)
    best_on_grid = max(transferability.logme_evidence(features, target, alpha, beta)
                       for alpha, beta in grid)
    assert fit.log_evidence > best_on_grid


@pytest.mark.parametrize("num_examples, dim", [(24, 40), (200, 10)])
def test_logme_invariant_to_example_order_and_feature_rotation(num_examples, dim):
  features, labels = interior_logme_data(num_examples, dim, seed=3)
  reference = transferability.logme(features, labels)
  order = np.random.default_rng(1).permutation(num_examples)
  columns = np.random.default_rng(2).permutation(dim)
  assert transferability.logme(features[order], labels[order]) == pytest.approx(
      reference, abs=1e-10)
  assert transferability.logme(features[:, columns], labels) == pytest.approx(
      reference, abs=1e-10)
  rotated = features @ random_rotation(dim, seed=4)
  assert transferability.logme(rotated, labels) == pytest.approx(reference, abs=1e-10)
  # Label names do not matter either, only the partition they make.
  assert transferability.logme(features, np.array(["c", "a", "b"])[labels]) == pytest.approx(
      reference, abs=1e-12)


# --- LEEP ----------------------------------------------------------------------------

def leep_by_definition(probabilities, labels):
  """LEEP written from the paper's definitions with plain loops."""
  n, num_source = probabilities.shape
  classes = sorted(set(labels.tolist()))
  joint = {(y, z): sum(probabilities[i, z] for i in range(n) if labels[i] == y) / n
           for y in classes for z in range(num_source)}
  marginal = {z: sum(joint[y, z] for y in classes) for z in range(num_source)}
  total = 0.0
  for i in range(n):
    total += np.log(sum(joint[labels[i], z] / marginal[z] * probabilities[i, z]
                        for z in range(num_source) if marginal[z] > 0))
  return total / n


def test_leep_matches_its_definition():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 40)
  probabilities = rng.dirichlet(np.full(5, 0.5), size=40)
  assert transferability.leep(probabilities, labels) == pytest.approx(
      leep_by_definition(probabilities, labels), rel=1e-12)


def test_leep_is_zero_for_a_perfect_relabelling():
  """One-hot source classes that name the target classes exactly (a bijection)."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 50)
  bijection = np.array([2, 0, 3, 1])
  # Seven source classes, three of which no example uses (zero columns).
  probabilities = np.eye(7)[bijection[labels]]
  assert transferability.leep(probabilities, labels) == pytest.approx(0.0, abs=1e-12)


def test_leep_of_uniform_probabilities_is_the_label_prior_term():
  labels = np.repeat([0, 1, 2], [5, 10, 25])
  prior = np.array([5, 10, 25]) / 40
  uniform = np.full((40, 6), 1 / 6)
  assert transferability.leep(uniform, labels) == pytest.approx(
      np.sum(prior * np.log(prior)), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_leep_is_at_most_zero(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, 30)
  probabilities = rng.dirichlet(np.full(8, 0.3), size=30).astype(np.float32)  # as from a network
  assert transferability.leep(probabilities, labels) <= 0.0


# --- NCE -----------------------------------------------------------------------------

def test_nce_matches_its_definition():
  rng = np.random.default_rng(0)
  source, labels = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
  expected = 0.0
  for y in range(3):
    for z in range(4):
      joint = np.mean((labels == y) & (source == z))
      if joint > 0:
        expected += joint * np.log(joint / np.mean(source == z))
  assert transferability.nce(source, labels) == pytest.approx(expected, rel=1e-12)


def test_nce_is_zero_when_the_target_is_a_function_of_the_source():
  source = np.random.default_rng(0).integers(0, 6, 60)
  assert transferability.nce(source, source % 3) == pytest.approx(0.0, abs=1e-12)


def test_nce_of_a_constant_source_is_minus_the_label_entropy():
  labels = np.repeat([0, 1, 2], [5, 10, 25])
  prior = np.array([5, 10, 25]) / 40
  assert transferability.nce(np.zeros(40, int), labels) == pytest.approx(
      np.sum(prior * np.log(prior)), rel=1e-12)


# --- H-score -------------------------------------------------------------------------

def test_h_score_matches_sklearn_ledoit_wolf_and_class_mean_covariance():
  features, labels = noise_features(0, dim=5)
  features = features + 0.7 * np.eye(3, 5)[labels]
  class_means = np.stack([features[labels == c].mean(axis=0) for c in range(3)])[labels]
  between = np.cov(class_means, rowvar=False, bias=True)
  estimate = LedoitWolf().fit(features)
  expected = np.trace(np.linalg.inv(estimate.covariance_) @ ((1 - estimate.shrinkage_) * between))
  assert transferability.h_score(features, labels) == pytest.approx(expected, rel=1e-10)
  original = np.trace(np.linalg.inv(np.cov(features, rowvar=False, bias=True)) @ between)
  assert transferability.h_score(features, labels, shrinkage=0.0) == pytest.approx(
      original, rel=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_h_score_lies_between_zero_and_classes_minus_one(seed):
  """cov(f) = within + between, so tr(cov^-1 between) is in [0, C - 1] (also shrunk)."""
  rng = np.random.default_rng(seed)
  labels = np.arange(40) % 4
  features = rng.standard_normal((40, 7)) + rng.standard_normal((4, 7))[labels]
  for shrinkage in (None, 0.0, 0.5):
    score = transferability.h_score(features, labels, shrinkage=shrinkage)
    assert -1e-12 <= score <= 3 + 1e-12
  tight = 30 * np.eye(4, 7)[labels] + 1e-3 * rng.standard_normal((40, 7))
  assert transferability.h_score(tight, labels, shrinkage=0.0) == pytest.approx(3.0, abs=1e-4)


def test_h_score_invariances():
  """Unregularised: any invertible affine map. Shrunk: a scaling, rotation and shift."""
  rng = np.random.default_rng(0)
  labels = np.arange(200) % 3
  features = rng.standard_normal((200, 5)) + np.eye(3, 5)[labels]
  shift = rng.standard_normal(5)
  # Well-conditioned (condition number 3), so the comparison is not rounding-limited.
  linear_map = random_rotation(5, 1) @ np.diag([1.0, 1.5, 2.0, 2.5, 3.0]) @ random_rotation(5, 2)
  original = transferability.h_score(features, labels, shrinkage=0.0)
  assert transferability.h_score(features @ linear_map + shift, labels,
                                 shrinkage=0.0) == pytest.approx(original, rel=1e-9)
  similarity = 3.7 * random_rotation(5, 3)
  for shrinkage in (None, 0.3):
    reference = transferability.h_score(features, labels, shrinkage=shrinkage)
    assert transferability.h_score(features @ similarity + shift, labels,
                                   shrinkage=shrinkage) == pytest.approx(reference, rel=1e-9)


# --- cross-validated accuracies ------------------------------------------------------

@pytest.mark.parametrize("score", [transferability.knn_accuracy,
                                   transferability.linear_probe_accuracy])
def test_accuracies_do_not_depend_on_example_order(score):
  rng = np.random.default_rng(0)
  labels = np.arange(60) % 3
  features = rng.standard_normal((60, 4)) + 0.8 * np.eye(3, 4)[labels]
  reference = score(features, labels)
  assert 0.4 < reference < 1.0  # an informative case, not a trivial 0 or 1
  for seed in range(3):
    order = np.random.default_rng(10 + seed).permutation(60)
    assert score(features[order], labels[order]) == reference


def test_knn_accuracy_does_not_depend_on_column_order():
  rng = np.random.default_rng(1)
  labels = np.arange(60) % 3
  features = rng.standard_normal((60, 5)) + 0.8 * np.eye(3, 5)[labels]
  columns = np.random.default_rng(2).permutation(5)
  assert transferability.knn_accuracy(features[:, columns], labels) == (
      transferability.knn_accuracy(features, labels))


# --- errors --------------------------------------------------------------------------

GOOD_FEATURES, GOOD_LABELS = separated_features(0)
GOOD_PROBABILITIES = np.full((60, 4), 0.25)


@pytest.mark.parametrize("call, phrase", [
    (lambda: transferability.logme(GOOD_FEATURES[:, 0], GOOD_LABELS), "2-D array"),
    (lambda: transferability.logme(GOOD_FEATURES[:50], GOOD_LABELS), "60 labels for 50 rows"),
    (lambda: transferability.h_score(GOOD_FEATURES, np.zeros(60)), "at least 2 target classes"),
    (lambda: transferability.logme(GOOD_FEATURES, np.r_[GOOD_LABELS[:59], 7]),
     "class 7 has 1 example"),
    (lambda: transferability.logme(np.where(GOOD_FEATURES > 9, np.nan, GOOD_FEATURES),
                                   GOOD_LABELS), "non-finite"),
    (lambda: transferability.h_score(np.zeros((60, 0)), GOOD_LABELS), "no features"),
    (lambda: transferability.knn_accuracy(GOOD_FEATURES[:9], np.arange(9) % 3), "lower folds"),
    (lambda: transferability.linear_probe_accuracy(GOOD_FEATURES, GOOD_LABELS, folds=25),
     "lower folds to at most 20"),
    (lambda: transferability.knn_accuracy(GOOD_FEATURES, GOOD_LABELS, k=50), "lower k"),
    (lambda: transferability.leep(GOOD_PROBABILITIES - 0.3, GOOD_LABELS), "negative"),
    (lambda: transferability.leep(GOOD_PROBABILITIES * 2, GOOD_LABELS), "sum to 1"),
    (lambda: transferability.nce(GOOD_PROBABILITIES, GOOD_LABELS), "argmax"),
    (lambda: transferability.h_score(GOOD_FEATURES, GOOD_LABELS, shrinkage=1.5),
     r"shrinkage must lie in \[0, 1\]"),
])
def test_bad_inputs_raise_a_helpful_error(call, phrase):
  with pytest.raises(TransferabilityError, match=phrase):
    call()
  assert issubclass(TransferabilityError, ValueError)


# --- registry ------------------------------------------------------------------------

def test_compute_scores_runs_and_times_every_requested_score():
  features, labels = separated_features(1)
  probabilities = np.random.default_rng(0).dirichlet(np.ones(5), size=len(labels))
  names = list(transferability.SCORES)
  results = transferability.compute_scores(names, features=features, labels=labels,
                                           source_probabilities=probabilities,
                                           options={"knn_accuracy": {"k": 3}})
  assert list(results) == names
  assert all(seconds >= 0 for _, seconds in results.values())
  assert results["logme"][0] == transferability.logme(features, labels)
  assert results["knn_accuracy"][0] == transferability.knn_accuracy(features, labels, k=3)
  assert results["leep"][0] == transferability.leep(probabilities, labels)
  assert results["nce"][0] == transferability.nce(probabilities.argmax(axis=1), labels)
  assert {info.needs for info in transferability.SCORES.values()} == {
      "features", "source_probabilities"}


def test_compute_scores_explains_missing_inputs_and_unknown_names():
  features, labels = separated_features(0)
  with pytest.raises(TransferabilityError, match="source-head probabilities.*last stage only"):
    transferability.compute_scores(["logme", "leep"], features=features, labels=labels)
  with pytest.raises(TransferabilityError, match="logme needs features"):
    transferability.compute_scores(["logme"], labels=labels,
                                   source_probabilities=GOOD_PROBABILITIES)
  with pytest.raises(TransferabilityError, match="did you mean 'logme'"):
    transferability.compute_scores(["logmee"], features=features, labels=labels)
