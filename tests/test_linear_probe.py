"""Linear probes (linear_probe.py): the vmapped folds and grid against heads trained one by
one, the choice by cross-validation on the train features only, and the command line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tlflax.inference import linear_probe
from tlflax.cli import linear_probe as linear_probe_cli

LEARNING_RATES = (0.01, 0.1, 0.3)
WEIGHT_DECAYS = (0.0, 1e-2, 1e-1)


def blobs(num_examples, num_classes=3, dim=6, spread=1.0, seed=0, offset=10.0):
  """Gaussian clusters around random centres (far apart: linearly separable).

  The features are shifted and unevenly scaled so standardisation matters.
  """
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).standard_normal((num_classes, dim)) * 3.0
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  x = centres[labels] + spread * rng.standard_normal((num_examples, dim))
  x = x * np.linspace(0.1, 5.0, dim) + offset
  return x.astype(np.float32), labels


def reference_heads(train_x, train_y, num_classes, steps, order):
  """Trains heads the plain way: a Python loop of steps, written without the module.

  Returns a function (learning_rate, weight_decay) -> (params, standardised x).
  """
  x = np.asarray(train_x, np.float64)
  x = jnp.asarray((x - x.mean(0)) / x.std(0), jnp.float32)
  labels = jnp.asarray(train_y)

  def loss(params, rows, weight_decay):
    logits = jnp.dot(x[rows], params["kernel"], precision="highest") + params["bias"]
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[rows][:, None], axis=1)
    return -jnp.mean(picked) + weight_decay / 2 * jnp.sum(params["kernel"] ** 2)
  gradient = jax.jit(jax.grad(loss))  # compiled once for every head

  def train(learning_rate, weight_decay):
    params = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros((num_classes,))}
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)
    for step in range(steps):
      rows = np.arange(len(x)) if order is None else order[step]
      updates, opt_state = optimizer.update(gradient(params, rows, weight_decay), opt_state,
                                            params)
      params = optax.apply_updates(params, updates)
    return params, np.asarray(x)
  return train


@pytest.mark.parametrize("batch_size", [None, 16])
def test_each_fold_head_equals_one_trained_alone_on_the_other_folds(batch_size):
  train_x, train_y = blobs(90, spread=3.0)  # overlapping: accuracies differ per point
  steps = 30
  cv = linear_probe.cross_validate(train_x, train_y, 3, LEARNING_RATES, WEIGHT_DECAYS,
                                   steps=steps, batch_size=batch_size, seed=5, folds=3)
  assert cv.accuracy.shape == (3, 3, 3) and cv.folds == 3
  np.testing.assert_array_equal(cv.fold_of, linear_probe.stratified_folds(train_y, 3, seed=5))
  for fold in range(3):
    rows, held_out = cv.fold_of != fold, cv.fold_of == fold
    order = (None if batch_size is None
             else linear_probe.minibatch_order(int(rows.sum()), batch_size, steps, 5))
    train_alone = reference_heads(train_x[rows], train_y[rows], 3, steps, order)
    for i, rate in enumerate(LEARNING_RATES):
      for j, decay in enumerate(WEIGHT_DECAYS):
        params, _ = train_alone(rate, decay)
        # float32 sums over the same rows, reduced in another order when
        # vmapped over folds and grid points: a few ulps, grown over 30 steps.
        np.testing.assert_allclose(cv.kernels[i, j, fold], params["kernel"], rtol=1e-4,
                                   atol=1e-5, err_msg=f"fold {fold} lr={rate} wd={decay}")
        np.testing.assert_allclose(cv.biases[i, j, fold], params["bias"], rtol=1e-4, atol=1e-5)
        assert cv.accuracy[i, j, fold] == linear_probe.accuracy(
            cv.head(i, j, fold), train_x[held_out], train_y[held_out])
  # The heads did not all learn the same thing.
  assert len({round(float(np.abs(k).sum()), 3) for k in cv.kernels[:, :, 0].reshape(9, -1)}) == 9


def test_separable_problem_is_solved():
  train_x, train_y = blobs(200, num_classes=4, dim=8, spread=0.3)
  eval_x, eval_y = blobs(100, num_classes=4, dim=8, spread=0.3, seed=1)
  result = linear_probe.select_and_evaluate(train_x, train_y, eval_x, eval_y, 4, [1e-3, 1e-1],
                                            [0.0, 1e-3], steps=200)
  assert result.cv_accuracy[result.chosen_index] == 1.0
  assert result.eval_accuracy == result.train_accuracy == 1.0
  np.testing.assert_array_equal(result.probe.predict(eval_x), eval_y)


def test_a_point_below_the_best_is_not_chosen():
  train_x, train_y = blobs(150, spread=3.0)
  # A tiny rate barely moves from zero weights: a poor probe.
  result = linear_probe.select_and_evaluate(train_x, train_y, None, None, 3, [1e-4, 0.1],
                                            [0.0], steps=100)
  assert result.cv_accuracy[1, 0] > result.cv_accuracy[0, 0]
  assert result.chosen_index == (1, 0)


def test_weight_decay_shrinks_the_weights():
  train_x, train_y = blobs(120, spread=0.5)
  norms = [np.linalg.norm(linear_probe.fit(train_x, train_y, 3, 0.1, decay, steps=300).kernel)
           for decay in (0.0, 1e-2, 1e-1, 1.0)]
  assert (np.diff(norms) < 0).all(), norms
  assert norms[0] > 3 * norms[-1]


def test_bad_inputs_raise_clear_errors():
  x, y = blobs(20)
  fit = linear_probe.select_and_evaluate
  with pytest.raises(ValueError, match="train labels have shape \\(19,\\), but there are 20"):
    fit(x, y[:19], x, y, 3, [0.1], [0.0])
  with pytest.raises(ValueError, match="eval labels run from 0 to 3, outside 0..2"):
    fit(x, y, x, np.where(y == 2, 3, y), 3, [0.1], [0.0])
  with pytest.raises(ValueError, match="outside 0..2"):
    fit(x, y - 1, x, y, 3, [0.1], [0.0])
  with pytest.raises(ValueError, match="learning_rates is empty"):
    fit(x, y, x, y, 3, [], [0.0])
  with pytest.raises(ValueError, match="weight_decays is empty"):
    fit(x, y, x, y, 3, [0.1], [])
  with pytest.raises(ValueError, match="Bad weight_decays \\[-1.0\\]"):
    fit(x, y, x, y, 3, [0.1], [-1.0])
  with pytest.raises(ValueError, match="6 values per example but eval features 5"):
    fit(x, y, x[:, :5], y, 3, [0.1], [0.0])
  with pytest.raises(ValueError, match="labels must be integers"):
    fit(x, y.astype(np.float32), x, y, 3, [0.1], [0.0])
  with pytest.raises(ValueError, match="folds must be at least 2"):
    fit(x, y, x, y, 3, [0.1], [0.0], folds=1)


def test_minibatch_order_covers_each_epoch_once():
  order = linear_probe.minibatch_order(10, 3, 7, seed=0)
  assert order.shape == (7, 3)
  for epoch in (order[0:3], order[3:6]):
    assert len(set(epoch.ravel())) == 9  # 3 full batches, no row twice
  assert not np.array_equal(order[0:3], order[3:6])
  np.testing.assert_array_equal(order, linear_probe.minibatch_order(10, 3, 7, seed=0))
  with pytest.raises(ValueError, match="batch_size must be between 1 and the 10"):
    linear_probe.minibatch_order(10, 11, 7, seed=0)


def test_format_cv_grid_marks_the_chosen_point():
  x, y = blobs(60, spread=0.3)
  result = linear_probe.select_and_evaluate(x, y, None, None, 3, [1e-4, 0.1], [0.0, 1e-3],
                                            steps=50, folds=3)
  lines = linear_probe.format_cv_grid(result).splitlines()
  assert lines[0] == "| learning rate \\ weight decay | 0 | 0.001 |"
  assert lines[1] == "|---|---|---|"
  assert lines[3] == "| 0.1 | 100.0 ± 0.0 | **100.0 ± 0.0** |"  # the tie: the larger decay
  assert "**" not in lines[2]


# ------------------------------------------------ choice by cross-validation


def test_folds_are_stratified_seeded_and_cover_every_example_once():
  labels = np.repeat(np.arange(3), [12, 7, 5])
  folds = linear_probe.stratified_folds(labels, 5, seed=0)
  assert sorted(np.bincount(folds)) == [4, 5, 5, 5, 5]  # sizes differ by at most one
  for label in range(3):
    per_fold = np.bincount(folds[labels == label], minlength=5)
    assert per_fold.max() - per_fold.min() <= 1, (label, per_fold)
  np.testing.assert_array_equal(folds, linear_probe.stratified_folds(labels, 5, seed=0))
  assert not np.array_equal(folds, linear_probe.stratified_folds(labels, 5, seed=1))
  # A class of 3 examples allows 3 folds; one of 1 allows none.
  assert linear_probe.fold_count(np.repeat(np.arange(3), [12, 7, 3]), 5) == 3
  with pytest.raises(ValueError, match="at least 2 train examples of every class.*but class 2 "
                                       "has 1. Add train examples"):
    linear_probe.fold_count(np.array([0, 0, 1, 1, 2]), 5)


def probe_problem():
  """Overlapping classes, a grid whose points disagree on some eval examples."""
  train_x, train_y = blobs(150, spread=3.0)
  eval_x, eval_y = blobs(90, spread=3.0, seed=1)
  return train_x, train_y, eval_x, eval_y, (1e-4, 1e-2, 0.3), (0.0, 0.1, 1.0)


def test_the_eval_split_takes_no_part_in_the_choice():
  train_x, train_y, eval_x, eval_y, rates, decays = probe_problem()
  result = linear_probe.select_and_evaluate(train_x, train_y, eval_x, eval_y, 3, rates,
                                            decays, steps=60)
  # Other eval labels or features: the same choice, the same head, another eval score.
  shuffled = np.random.default_rng(0).permutation(eval_y)
  noise = np.random.default_rng(1).standard_normal(eval_x.shape).astype(np.float32)
  for other_x, other_y in ((eval_x, shuffled), (noise, eval_y)):
    other = linear_probe.select_and_evaluate(train_x, train_y, other_x, other_y, 3, rates,
                                             decays, steps=60)
    assert other.chosen_index == result.chosen_index
    np.testing.assert_array_equal(other.cross_validation.accuracy,
                                  result.cross_validation.accuracy)
    np.testing.assert_array_equal(other.probe.kernel, result.probe.kernel)
    assert other.eval_accuracy != result.eval_accuracy
  assert result.eval_accuracy == linear_probe.accuracy(result.probe, eval_x, eval_y)

  # Eval labels that one other grid point predicts exactly: a choice on the
  # eval split would take that point; the cross-validated choice stays.
  refits = {(i, j): linear_probe.fit(train_x, train_y, 3, rate, decay, steps=60)
            for i, rate in enumerate(rates) for j, decay in enumerate(decays)}
  for favoured, probe in refits.items():
    rigged = probe.predict(eval_x)
    on_eval = np.zeros((3, 3))
    for point, other_probe in refits.items():
      on_eval[point] = linear_probe.accuracy(other_probe, eval_x, rigged)
    if favoured != result.chosen_index and linear_probe.choose(on_eval, rates,
                                                               decays) == favoured:
      break
  else:
    raise AssertionError("no grid point that a choice on the eval split would prefer")
  rigged_result = linear_probe.select_and_evaluate(train_x, train_y, eval_x, rigged, 3, rates,
                                                   decays, steps=60)
  assert rigged_result.chosen_index == result.chosen_index != favoured
  assert rigged_result.eval_accuracy < 1.0


def test_the_chosen_point_is_the_best_mean_and_is_refit_on_all_train_features():
  train_x, train_y, eval_x, eval_y, rates, decays = probe_problem()
  result = linear_probe.select_and_evaluate(train_x, train_y, eval_x, eval_y, 3, rates,
                                            decays, steps=60, seed=2)
  assert result.folds == 5 and result.cross_validation.accuracy.shape == (3, 3, 5)
  assert result.cv_accuracy[result.chosen_index] == result.cv_accuracy.max()
  np.testing.assert_allclose(result.cv_accuracy_std,
                             np.std(result.cross_validation.accuracy, axis=-1, ddof=1))
  params, _ = reference_heads(train_x, train_y, 3, 60, None)(result.chosen_learning_rate,
                                                             result.chosen_weight_decay)
  # The refit against a plain loop on all train features (reduction order: a few ulps).
  np.testing.assert_allclose(result.probe.kernel, params["kernel"], rtol=1e-4, atol=1e-5)
  assert result.train_accuracy == linear_probe.accuracy(result.probe, train_x, train_y)
  # Deterministic given the seed.
  again = linear_probe.select_and_evaluate(train_x, train_y, eval_x, eval_y, 3, rates, decays,
                                           steps=60, seed=2)
  np.testing.assert_array_equal(again.cross_validation.accuracy,
                                result.cross_validation.accuracy)
  np.testing.assert_array_equal(again.probe.kernel, result.probe.kernel)


def test_ties_go_to_the_stronger_regularisation():
  train_x, train_y = blobs(100, num_classes=4, dim=8, spread=0.3)
  result = linear_probe.select_and_evaluate(train_x, train_y, None, None, 4, [0.3, 0.1],
                                            [0.0, 1e-3], steps=200)
  assert (result.cross_validation.accuracy == 1.0).all()
  assert (result.chosen_learning_rate, result.chosen_weight_decay) == (0.1, 1e-3)
  assert result.eval_accuracy is None


def correlated_classes(num_examples, seed=0):
  """Classes told apart against strongly correlated noise: the class-mean
  direction that tiny weights point along is poor, so a probe that learns
  more (a larger learning rate in few steps) does better."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, num_examples).astype(np.int32)
  means = np.array([[0, 0, 0, 0], [2, 2.6, 0, 0], [0, 0, 2, 2.6]])
  shared = 3.0 * rng.standard_normal((num_examples, 2))  # one factor per pair of features
  x = means[labels] + np.repeat(shared, 2, axis=1) + 0.3 * rng.standard_normal((num_examples, 4))
  return x.astype(np.float32), labels


EDGE_WARNING = ("The chosen learning rate 0.1 is the largest in learning_rates [0.01, 0.1]: a "
                "larger one may do better. Extend the grid upward, e.g. add 1.")


def test_a_choice_on_the_edge_of_the_grid_is_warned_about(caplog):
  train_x, train_y = correlated_classes(150)
  with caplog.at_level("WARNING", logger="tlflax.inference.linear_probe"):
    result = linear_probe.select_and_evaluate(train_x, train_y, None, None, 3, [0.01, 0.1],
                                              [0.0], steps=20)
  assert result.cv_accuracy[1, 0] > result.cv_accuracy[0, 0]
  assert result.warnings == (EDGE_WARNING,)
  assert EDGE_WARNING in caplog.text
  assert linear_probe.edge_warnings([0.1, 0.01, 1.0], [0.0, 1e-4], (1, 0)) == [
      "The chosen learning rate 0.01 is the smallest in learning_rates [0.1, 0.01, 1]: a "
      "smaller one may do better. Extend the grid downward, e.g. add 0.001."]
  assert linear_probe.edge_warnings([0.1], [1e-4, 1e-3, 1e-2], (0, 0))[0].endswith(
      "Extend the grid downward, e.g. add 1e-05 or 0.")
  # Inside the grid, a weight decay of 0, or an axis of one value: nothing to say.
  assert linear_probe.edge_warnings([0.01, 0.1, 1.0], [0.0, 1e-3], (1, 0)) == []
  assert linear_probe.edge_warnings([0.1], [0.0], (0, 0)) == []


def test_cross_validation_needs_two_examples_of_every_class():
  train_x, train_y = blobs(40)
  train_y[train_y == 2] = 1
  train_y[0] = 2  # one example of class 2
  with pytest.raises(ValueError, match="but class 2 has 1"):
    linear_probe.select_and_evaluate(train_x, train_y, train_x, train_y, 3, [0.1], [0.0])
  train_y[1] = 2  # two: two folds
  result = linear_probe.select_and_evaluate(train_x, train_y, train_x, train_y, 3, [0.1],
                                            [0.0], steps=5)
  assert result.folds == 2
  with pytest.raises(ValueError, match="batch_size must be between 1 and the 20 examples a "
                                       "cross-validation fold trains on \\(2 folds of 40"):
    linear_probe.select_and_evaluate(train_x, train_y, None, None, 3, [0.1], [0.0],
                                     batch_size=21)


def write_features(directory, train, evaluation, num_classes=3):
  for split, (x, y) in (("train", train), ("eval", evaluation)):
    np.save(directory / f"{split}_features.npy", x)
    np.save(directory / f"{split}_labels.npy", y)
  (directory / "info.json").write_text(json.dumps(
      {"extraction": {"model": "cifar_resnet20", "stage": "stage3"},
       "num_classes": num_classes}))


def test_command_line_reports_cross_validation_and_eval_apart(tmp_path, capsys):
  train_x, train_y = blobs(90, spread=3.0)
  eval_x, eval_y = blobs(30, spread=3.0, seed=1)
  write_features(tmp_path, (train_x, train_y), (eval_x, eval_y))

  assert linear_probe_cli.main(["--features", str(tmp_path), "--learning_rates", "0.01,0.1",
                                "--weight_decays=0,1e-3", "--steps", "50", "--folds", "3",
                                "--seed", "1"]) == 0
  out = capsys.readouterr().out
  expected = linear_probe.select_and_evaluate(train_x, train_y, eval_x, eval_y, 3, [0.01, 0.1],
                                              [0.0, 1e-3], steps=50, seed=1, folds=3)
  chosen = expected.chosen_index
  assert "cifar_resnet20 stage3 features (90 train, 30 eval examples, 3 classes)" in out
  assert ("Cross-validation accuracy (%) on the train features, mean ± sd over 3 folds (the "
          "eval split takes no part in the choice):\n| learning rate \\ weight decay | 0 | "
          "0.001 |") in out
  assert (f"Chosen: learning rate {expected.chosen_learning_rate:g}, weight decay "
          f"{expected.chosen_weight_decay:g} (highest mean cross-validation accuracy; ties go "
          "to the stronger regularisation") in out
  assert (f"Cross-validation accuracy (train features, 3 folds): "
          f"{100 * expected.cv_accuracy[chosen]:.2f} ± "
          f"{100 * expected.cv_accuracy_std[chosen]:.2f}%") in out
  assert (f"Eval accuracy (eval split, 30 examples, scored once after the choice): "
          f"{100 * expected.eval_accuracy:.2f}%") in out
  assert ("Warning: " in out) == bool(expected.warnings)
  saved = json.loads((tmp_path / "linear_probe.json").read_text())
  assert saved["cv_accuracy_mean"] == expected.cv_accuracy.tolist()
  assert saved["chosen"] == {"learning_rate": expected.chosen_learning_rate,
                             "weight_decay": expected.chosen_weight_decay,
                             "cv_accuracy_mean": expected.cv_accuracy[chosen],
                             "cv_accuracy_std": expected.cv_accuracy_std[chosen]}
  assert saved["eval"] == {"examples": 30, "accuracy": expected.eval_accuracy}
  assert saved["folds"] == 3 and saved["warnings"] == list(expected.warnings)
  assert "val_accuracy" not in saved and "best" not in saved  # no name to mistake

  # A grid whose best value is on its edge: the warning is printed and saved.
  write_features(tmp_path, correlated_classes(150), correlated_classes(30, seed=1))
  assert linear_probe_cli.main(["--features", str(tmp_path), "--learning_rates", "0.01,0.1",
                                "--weight_decays=0", "--steps", "20"]) == 0
  assert f"\nWarning: {EDGE_WARNING}\n" in capsys.readouterr().out
  assert json.loads((tmp_path / "linear_probe.json").read_text())["warnings"] == [EDGE_WARNING]


def test_command_line_errors_are_one_line(tmp_path, capsys):
  train_x, train_y = blobs(30)
  train_y[train_y == 2] = 0
  train_y[3] = 2
  write_features(tmp_path, (train_x, train_y), blobs(10, seed=1))
  assert linear_probe_cli.main(["--features", str(tmp_path), "--steps", "5"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("tlflax.cli.linear_probe: error: Cross-validation needs at least 2 "
                            "train examples of every class")
  assert not (tmp_path / "linear_probe.json").exists()
  assert linear_probe_cli.main(["--features", str(tmp_path / "nowhere")]) == 1
  assert "tlflax.cli.linear_probe: error:" in capsys.readouterr().err


def test_means_equal_but_for_the_last_bit_are_a_tie():
  """A mean of fold accuracies summed in another order differs in the last
  bit (0.6081632653061224 vs ...225, seen on a real probe): still a tie."""
  scores = np.array([[0.6081632653061224, 0.5], [0.6, 0.6081632653061225]])
  # Tied at the top: the larger weight decay wins even where its mean is the
  # smaller float, then the smaller learning rate.
  assert linear_probe.choose(scores, [0.001, 0.1], [0.0, 1e-3]) == (1, 1)
  scores = np.array([[0.6081632653061224, 0.5], [0.6081632653061225, 0.4]])
  assert linear_probe.choose(scores, [0.001, 0.1], [0.0, 1e-3]) == (0, 0)
