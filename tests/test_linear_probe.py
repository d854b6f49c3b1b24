"""Linear probes (linear_probe.py): the vmapped grid against heads trained one by one."""

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


@pytest.mark.parametrize("batch_size", [None, 32])
def test_grid_equals_each_point_trained_alone(batch_size):
  train_x, train_y = blobs(100, spread=3.0)  # overlapping: accuracies differ per point
  val_x, val_y = blobs(60, spread=3.0, seed=1)
  steps = 30
  result = linear_probe.fit_grid(train_x, train_y, val_x, val_y, 3, LEARNING_RATES,
                                 WEIGHT_DECAYS, steps=steps, batch_size=batch_size, seed=5)
  order = None if batch_size is None else linear_probe.minibatch_order(100, batch_size, steps, 5)
  train_alone = reference_heads(train_x, train_y, 3, steps, order)
  for i, rate in enumerate(LEARNING_RATES):
    for j, decay in enumerate(WEIGHT_DECAYS):
      params, standardized = train_alone(rate, decay)
      np.testing.assert_allclose(result.kernels[i, j], params["kernel"], rtol=1e-4, atol=1e-5,
                                 err_msg=f"lr={rate} wd={decay}")
      np.testing.assert_allclose(result.biases[i, j], params["bias"], rtol=1e-4, atol=1e-5)
      logits = standardized @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
      assert result.train_accuracy[i, j] == np.mean(logits.argmax(1) == train_y)
      assert result.val_accuracy[i, j] == linear_probe.accuracy(result.probe(i, j), val_x, val_y)
  # The heads did not all learn the same thing.
  assert len({round(float(np.abs(k).sum()), 3) for k in result.kernels.reshape(9, -1)}) == 9


def test_separable_problem_is_solved_and_best_is_the_grid_argmax():
  train_x, train_y = blobs(200, num_classes=4, dim=8, spread=0.3)
  val_x, val_y = blobs(100, num_classes=4, dim=8, spread=0.3, seed=1)
  result = linear_probe.fit_grid(train_x, train_y, val_x, val_y, 4, [1e-3, 1e-1],
                                 [0.0, 1e-3], steps=200)
  assert result.best_val_accuracy == 1.0
  assert result.val_accuracy[result.best_index] == result.val_accuracy.max()
  assert linear_probe.accuracy(result.best, val_x, val_y) == 1.0
  np.testing.assert_array_equal(result.best.predict(val_x), val_y)

  # Grid points tie at 100%: the smaller weight decay wins, then the smaller
  # learning rate, by value, whatever order the grid is given in.
  result = linear_probe.fit_grid(train_x, train_y, val_x, val_y, 4, [0.3, 0.1], [1e-3, 0.0],
                                 steps=200)
  assert (result.val_accuracy == 1.0).all()
  assert result.best_index == (1, 1)
  assert (result.best_learning_rate, result.best_weight_decay) == (0.1, 0.0)


def test_a_point_below_the_best_is_not_chosen():
  train_x, train_y = blobs(150, spread=3.0)
  val_x, val_y = blobs(150, spread=3.0, seed=1)
  # One step at a tiny rate barely moves from zero weights: a poor probe.
  result = linear_probe.fit_grid(train_x, train_y, val_x, val_y, 3, [1e-4, 0.1], [0.0],
                                 steps=100)
  assert result.val_accuracy[1, 0] > result.val_accuracy[0, 0]
  assert result.best_index == (1, 0)


def test_weight_decay_shrinks_the_weights():
  train_x, train_y = blobs(120, spread=0.5)
  val_x, val_y = blobs(30, spread=0.5, seed=1)
  result = linear_probe.fit_grid(train_x, train_y, val_x, val_y, 3, [0.1],
                                 [0.0, 1e-2, 1e-1, 1.0], steps=300)
  norms = np.linalg.norm(result.kernels[0].reshape(4, -1), axis=1)
  assert (np.diff(norms) < 0).all(), norms
  assert norms[0] > 3 * norms[-1]


def test_bad_inputs_raise_clear_errors():
  x, y = blobs(20)
  fit = linear_probe.fit_grid
  with pytest.raises(ValueError, match="train labels have shape \\(19,\\), but there are 20"):
    fit(x, y[:19], x, y, 3, [0.1], [0.0])
  with pytest.raises(ValueError, match="validation labels run from 0 to 3, outside 0..2"):
    fit(x, y, x, np.where(y == 2, 3, y), 3, [0.1], [0.0])
  with pytest.raises(ValueError, match="outside 0..2"):
    fit(x, y - 1, x, y, 3, [0.1], [0.0])
  with pytest.raises(ValueError, match="learning_rates is empty"):
    fit(x, y, x, y, 3, [], [0.0])
  with pytest.raises(ValueError, match="weight_decays is empty"):
    fit(x, y, x, y, 3, [0.1], [])
  with pytest.raises(ValueError, match="Bad weight_decays \\[-1.0\\]"):
    fit(x, y, x, y, 3, [0.1], [-1.0])
  with pytest.raises(ValueError, match="6 values per example but validation features 5"):
    fit(x, y, x[:, :5], y, 3, [0.1], [0.0])
  with pytest.raises(ValueError, match="batch_size must be between 1 and the 20"):
    fit(x, y, x, y, 3, [0.1], [0.0], batch_size=21)
  with pytest.raises(ValueError, match="labels must be integers"):
    fit(x, y.astype(np.float32), x, y, 3, [0.1], [0.0])


def test_minibatch_order_covers_each_epoch_once():
  order = linear_probe.minibatch_order(10, 3, 7, seed=0)
  assert order.shape == (7, 3)
  for epoch in (order[0:3], order[3:6]):
    assert len(set(epoch.ravel())) == 9  # 3 full batches, no row twice
  assert not np.array_equal(order[0:3], order[3:6])
  np.testing.assert_array_equal(order, linear_probe.minibatch_order(10, 3, 7, seed=0))


def test_format_grid_marks_the_best_point():
  x, y = blobs(60, spread=0.3)
  result = linear_probe.fit_grid(x, y, x, y, 3, [1e-4, 0.1], [0.0, 1e-3], steps=50)
  lines = linear_probe.format_grid(result).splitlines()
  assert lines[0] == "| learning rate \\ weight decay | 0 | 0.001 |"
  assert lines[1] == "|---|---|---|"
  assert lines[3].startswith("| 0.1 | **100.0** |")
  assert "**" not in lines[2]


def test_command_line_reads_features_and_writes_the_grid(tmp_path, capsys):
  train_x, train_y = blobs(90, spread=0.3)
  eval_x, eval_y = blobs(30, spread=0.3, seed=1)
  for split, x, y in (("train", train_x, train_y), ("eval", eval_x, eval_y)):
    np.save(tmp_path / f"{split}_features.npy", x)
    np.save(tmp_path / f"{split}_labels.npy", y)
  (tmp_path / "info.json").write_text(json.dumps(
      {"extraction": {"model": "cifar_resnet20", "stage": "stage3"}, "num_classes": 3}))

  assert linear_probe_cli.main(["--features", str(tmp_path), "--learning_rates", "0.01,0.1",
                            "--weight_decays=0,1e-3", "--steps", "50"]) == 0
  out = capsys.readouterr().out
  assert "cifar_resnet20 stage3 features (90 train, 30 eval examples, 3 classes)" in out
  assert "| learning rate \\ weight decay | 0 | 0.001 |" in out
  saved = json.loads((tmp_path / "linear_probe.json").read_text())
  expected = linear_probe.fit_grid(train_x, train_y, eval_x, eval_y, 3, [0.01, 0.1],
                                   [0.0, 1e-3], steps=50)
  assert saved["val_accuracy"] == expected.val_accuracy.tolist()
  assert saved["best"]["learning_rate"] == expected.best_learning_rate
  assert f"Best: learning rate {expected.best_learning_rate:g}" in out

  assert linear_probe_cli.main(["--features", str(tmp_path / "nowhere")]) == 1
  assert "tlflax.cli.linear_probe: error:" in capsys.readouterr().err
