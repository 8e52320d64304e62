"""The learner protocol and the common ALMA training round.

A learner is a set of pure functions over its own state (a pytree of arrays):

  init(key) -> state                     the predictor before any data (evaluated too)
  train_round(state, round, key) -> (state, RoundReport)
  evaluate(state, indices) -> {'error', 'loss'} on the test set
  params(state), inference_flops(state)  what the predictor costs to hold and to use
  restore(tree) -> state                 rebuild the state from a checkpointed tree

The object holding these functions keeps only what never changes over a run (the model, the
optimizer, the compiled steps, the device-resident data), so a state saved at any arrival
describes the learner completely.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alma_jax import steps
from alma_jax.stream import Round


@dataclasses.dataclass(frozen=True)
class DeviceData:
  """The data set's arrays, placed once on the devices (replicated) for the whole run."""
  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array


@dataclasses.dataclass(frozen=True)
class RoundReport:
  epochs: int = 0
  steps: int = 0
  train_examples: int = 0
  valid_examples: int = 0
  best_valid_accuracy: float = float('nan')
  train_flops: float = 0.0
  valid_flops: float = 0.0
  reference_flops: float = 0.0


class Learner(Protocol):
  def init(self, key) -> Any: ...
  def train_round(self, state, round: Round, key) -> tuple[Any, RoundReport]: ...
  def evaluate(self, state) -> dict[str, float]: ...
  def params(self, state) -> int: ...
  def inference_flops(self, state) -> float: ...
  def restore(self, tree) -> Any: ...


def to_tree(state):
  """A learner state as a plain tree of arrays (what checkpoints hold)."""
  return serialization.to_state_dict(state)


def classification_losses(apply_fn):
  """(loss_fn, metric_fn) of a classifier `apply_fn(params, images) -> logits`."""

  def loss_fn(params, images, labels, weights, key):
    del key
    ce = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, images), labels)
    return jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), 1.0)

  def metric_fn(params, images, labels, weights):
    logits = apply_fn(params, images)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {'correct': jnp.sum(weights * correct), 'loss': jnp.sum(weights * ce)}

  return loss_fn, metric_fn


def forward_flops_per_example(apply_fn, params, images, batch_size: int) -> float | None:
  x = jax.ShapeDtypeStruct((batch_size,) + images.shape[1:], images.dtype)
  flops = steps.cost_flops(jax.jit(apply_fn).lower(params, x).compile())
  return None if flops is None else flops / batch_size


def evaluate(trainer: steps.Trainer, params, images, labels, indices: np.ndarray) -> dict:
  """Error (1 - accuracy) and mean cross-entropy of `params` on `indices` of (images, labels)."""
  padded, n = steps.pad_indices(indices, trainer.eval_batch_size)
  sums = jax.device_get(trainer.evaluate(params, images, labels, padded, n))
  return {'error': 1.0 - float(sums['correct']) / n, 'loss': float(sums['loss']) / n}


def fit(trainer: steps.Trainer, params, opt_state, data: DeviceData, round: Round, key,
        train_config, flops: dict) -> tuple[Any, Any, RoundReport]:
  """The common ALMA round: epochs with early stopping on validation accuracy.

  Trains up to `max_epochs`; after every epoch measures validation accuracy; stops once it has not
  improved on the best by more than `patience_delta` for `patience` epochs. Returns the
  best-validation parameters, the final optimizer state and what the round cost.
  `flops` holds 'step' (one train step) and 'forward' (per example), either possibly None.
  """
  train_idx, n_train = steps.pad_indices(round.train, trainer.batch_size)
  valid_idx, n_valid = steps.pad_indices(round.valid, trainer.eval_batch_size)
  best_accuracy, best_params, bad_epochs, epochs = -np.inf, params, 0, 0
  steps_per_epoch = -(-n_train // trainer.batch_size)
  for epoch in range(train_config.max_epochs):
    params, opt_state = trainer.train_epoch(params, opt_state, data.train_images,
                                            data.train_labels, train_idx, n_train,
                                            jax.random.fold_in(key, epoch))
    sums = trainer.evaluate(params, data.train_images, data.train_labels, valid_idx, n_valid)
    accuracy = float(sums['correct']) / n_valid
    epochs = epoch + 1
    if accuracy > best_accuracy + train_config.patience_delta:
      best_accuracy, bad_epochs = accuracy, 0
      best_params = jax.tree.map(jnp.copy, params)
    else:
      bad_epochs += 1
      if bad_epochs >= train_config.patience:
        break
  train_examples = epochs * n_train
  valid_examples = epochs * n_valid
  forward = flops['forward'] or 0.0
  report = RoundReport(
      epochs=epochs, steps=epochs * steps_per_epoch, train_examples=train_examples,
      valid_examples=valid_examples, best_valid_accuracy=best_accuracy,
      train_flops=(flops['step'] or 0.0) * epochs * steps_per_epoch,
      valid_flops=forward * valid_examples, reference_flops=forward * train_examples)
  return best_params, opt_state, report


def restore_like(template, tree):
  """`tree` (restored without a target) in the structure of `template`."""
  return serialization.from_state_dict(template, tree)
