"""Pure train and eval steps: `(state, batch) -> (state, metrics)`.

The train step differentiates with respect to the trainable subtree only.
Frozen parameters enter the loss as constants, so JAX builds no backward pass
for them: when the frozen part is a prefix of the network (freeze depth k),
nothing is back-propagated through it, and a head-only step costs about one
forward pass. Gradient norms and clipping see trainable gradients only, so
nothing ever reads (and thereby forces) a full gradient.

Frozen BatchNorm layers run in inference mode (see `Freezing.frozen_batchnorm`),
so their statistics stay bit-identical too.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tlflax.freeze import Freezing
from tlflax.tree import flatten, unflatten


@flax.struct.dataclass
class TrainState:
  """Everything a training step changes.

  Attributes:
    step: number of steps taken.
    params: the full parameter tree (frozen and trainable).
    batch_stats: BatchNorm running statistics.
    opt_state: optimizer state over the trainable subtree only.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def create_train_state(variables, tx: optax.GradientTransformation,
                       freezing: Freezing) -> TrainState:
  """A fresh state: step 0, the given variables, optimizer state for trainable params."""
  trainable, _ = freezing.split(variables["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(trainable))


def merge_trees(*trees) -> dict[str, Any]:
  """Union of disjoint parameter subtrees (inverse of `Freezing.split`)."""
  merged = {}
  for tree in trees:
    merged.update(flatten(tree))
  return unflatten(merged)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def group_norms(tree, freezing: Freezing, prefix: str) -> dict[str, jax.Array]:
  """Global norm per learning-rate group (e.g. `update_norm/lr_x1`)."""
  labels = flatten(freezing.trainable_labels())
  sums = {}
  for path, value in flatten(tree).items():
    sums.setdefault(labels[path], []).append(jnp.sum(jnp.square(value.astype(jnp.float32))))
  return {f"{prefix}/{label}": jnp.sqrt(sum(parts)) for label, parts in sums.items()}


def with_frozen_batchnorm(model: nn.Module, freezing: Freezing, batch_stats) -> nn.Module:
  """The model with its frozen layers' BatchNorm held in inference mode."""
  return model.clone(frozen_batchnorm=freezing.frozen_batchnorm(batch_stats))


def _unchanged(images):
  return images


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    freezing: Freezing, label_smoothing: float = 0.0, dropout_seed: int = 0,
                    prepare_images: Callable[[Any], Any] | None = None,
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """Builds `train_step(state, batch, dropout_key=None) -> (state, metrics)`.

  Args:
    model: the backbone (+ head).
    tx: from `tlflax.optim.make_optimizer(..., full_tree=False)`.
    freezing: compiled freeze rules; must be the one `tx` was built for.
    label_smoothing: for the cross-entropy loss.
    dropout_seed: dropout keys are this seed folded with the step number, so a
      resumed run draws the same masks as an uninterrupted one. The step's
      optional third argument, `jax.random.key(dropout_seed)` or its
      `jax.random.key_data` (a plain uint32 array, which a multi-process
      mesh can replicate from the host), replaces this constant: runs that
      differ only in their seed then share one compiled program (through
      JAX's persistent compilation cache, also across processes) instead of
      each baking its seed in.
    prepare_images: applied to `batch["image"]` inside the step, on the
      device: the dataset's `device_transform()` (uint8 -> normalised float32);
      None passes the images on as they are.

  Returns:
    A pure function; `batch` holds "image" (NHWC) and "label" (int). Metrics: loss, accuracy, grad_norm (trainable
    parameters), state_finite (updated parameters and statistics), and per group
    grad_norm/... and update_norm/....
  """
  if freezing.all_frozen:
    raise ValueError("Every parameter is frozen: there is nothing to train. "
                     "Check the freeze rules.")

  prepare = prepare_images or _unchanged

  def train_step(state: TrainState, batch: dict, dropout_key=None):
    step_model = with_frozen_batchnorm(model, freezing, state.batch_stats)
    images = prepare(batch["image"])
    trainable, frozen = freezing.split(state.params)
    if dropout_key is None:
      dropout_key = jax.random.key(dropout_seed)
    elif not jnp.issubdtype(dropout_key.dtype, jax.dtypes.prng_key):
      dropout_key = jax.random.wrap_key_data(dropout_key)
    rngs = {"dropout": jax.random.fold_in(dropout_key, state.step)}

    def loss_fn(trainable_params):
      variables = {"params": merge_trees(trainable_params, frozen),
                   "batch_stats": state.batch_stats}
      logits, new_state = step_model.apply(variables, images, train=True,
                                           mutable=["batch_stats"], rngs=rngs)
      loss = cross_entropy(logits, batch["label"], label_smoothing)
      return loss, (logits, new_state.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)

    metrics = {
        "loss": loss,
        # Checked by the loop before it keeps a state: a finite loss can still
        # come with an update that overflows the parameters or statistics.
        "state_finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in
                                           jax.tree.leaves((trainable, batch_stats))])),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "grad_norm": optax.tree.norm(grads),
        **group_norms(grads, freezing, "grad_norm"),
        **group_norms(updates, freezing, "update_norm"),
    }
    new_state = state.replace(step=state.step + 1, params=merge_trees(trainable, frozen),
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, prepare_images: Callable[[Any], Any] | None = None,
                   ) -> Callable[[TrainState, dict], dict]:
  """Builds `eval_step(state, batch) -> metrics` (sums, so batches can be added).

  `prepare_images` is applied to `batch["image"]` on the device, as in
  `make_train_step`.
  """
  prepare = prepare_images or _unchanged

  def eval_step(state: TrainState, batch: dict):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         prepare(batch["image"]), train=False)
    labels = batch["label"]
    weight = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss_sum": jnp.sum(losses * weight),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weight),
            "count": jnp.sum(weight)}

  return eval_step
