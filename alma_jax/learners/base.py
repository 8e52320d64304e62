"""The learner protocol, and the common ALMA training round over a stack of members.

A learner is a set of pure functions over its own state (a pytree of arrays):

  init(key) -> state                     the predictor before any data (evaluated at the
                                         arrivals before the first round, if any)
  train_round(state, round, key) -> (state, RoundReport)
  evaluate(state[, images, labels]) -> {'error', 'loss'}   on the test set, or on given data
  parameters(state)                      the predictor's parameter tree
  params(state), inference_flops(state)  what the predictor costs to hold and to use
  flops([variables]) -> {'step', ...}   one member's FLOPs: its train step, forward per example
  restore(tree) -> state                 rebuild the state from a checkpointed tree

The object holding these functions keeps only what never changes over a run (the model, the
optimizer, the compiled steps, the placed data), so a state saved at any arrival
describes the learner completely.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np

from alma_jax import placement, steps
from alma_jax.stream import Round


@dataclasses.dataclass(frozen=True)
class RoundReport:
  epochs: int = 0
  steps: int = 0
  train_examples: int = 0
  train_flops: float = 0.0
  valid_flops: float = 0.0
  reference_flops: float = 0.0
  optimizer_bytes: float = 0.0  # of the optimizer state the round trained with

  def __add__(self, other: 'RoundReport') -> 'RoundReport':
    return RoundReport(*(a + b for a, b in zip(dataclasses.astuple(self),
                                               dataclasses.astuple(other))))


class Learner(Protocol):
  def init(self, key) -> Any: ...
  def train_round(self, state, round: Round, key) -> tuple[Any, RoundReport]: ...
  def evaluate(self, state, images=None, labels=None) -> dict[str, float]: ...
  def parameters(self, state) -> Any: ...
  def params(self, state) -> int: ...
  def inference_flops(self, state) -> float: ...
  def flops(self) -> dict: ...
  def restore(self, tree) -> Any: ...


def check_train(t) -> None:
  """Raises ValueError naming the first bad key of the `train` section (what `fit` reads)."""
  from alma_jax.config import fail
  for key in ('batch_size', 'max_epochs', 'patience', 'eval_batch_size', 'microbatches'):
    if t[key] < 1:
      fail(f'train.{key}', t[key], 'must be >= 1')
  if t.batch_size % t.microbatches:
    fail('train.microbatches', t.microbatches,
         f'must divide train.batch_size={t.batch_size} into equal slices')
  if t.patience_delta < 0:
    fail('train.patience_delta', t.patience_delta, 'must be >= 0')
  if t.stop_on not in ('accuracy', 'loss'):
    fail('train.stop_on', t.stop_on, "must be 'accuracy' or 'loss'")
  if t.compiled_epoch not in ('auto', 'yes', 'no'):
    fail('train.compiled_epoch', t.compiled_epoch, "must be 'auto', 'yes' or 'no'")


def to_tree(state):
  """A learner state as a plain tree of arrays (what checkpoints hold): its fields by name,
  those that hold nothing (None, empty) left out."""
  tree = serialization.to_state_dict(state)
  return {k: v for k, v in tree.items() if v is not None and not (isinstance(v, dict) and not v)}


def restore_like(template, tree):
  """`tree` (restored without a target) in the structure of `template`."""
  return serialization.from_state_dict(template, tree)


def softmax_cross_entropy(logits, labels):
  """`optax.softmax_cross_entropy_with_integer_labels` (the same values), with the labels' logits
  picked by a mask rather than gathered: a gather's gradient is a scatter-add, which XLA's
  deterministic GPU kernels make deterministic by sorting its indices (with the embedding's
  lookup, about 9 ms of GPT-2 small's 40 ms step on an H100 in 0.9.2; 29.8 ms without them, in
  0.9.5); a mask's is elementwise."""
  picked = labels[..., None] == jnp.arange(logits.shape[-1])
  return jax.nn.logsumexp(logits, -1) - jnp.sum(jnp.where(picked, logits, 0.0), -1)


def cross_entropy_loss(apply_train):
  """Weighted sum of the examples' cross-entropies in training mode (the trainer takes the mean
  over a batch), `apply_train(variables, inputs, key, real examples) -> (logits, updated
  collections)`. An example's loss is the mean over its targets (one for a classifier, one per
  token for a language model)."""

  def loss_fn(variables, images, labels, weights, key):
    logits, updated = apply_train(variables, images, key, weights > 0)
    ce = softmax_cross_entropy(logits, labels)
    per_example = ce.reshape(ce.shape[0], -1).mean(-1)
    return jnp.sum(weights * per_example), updated

  return loss_fn


def prediction_sums(log_probs, predicted, targets, weights) -> dict:
  """Weighted sums over a batch of correct predictions, cross-entropy (nats) and targets, for
  targets (B,) of a classifier or (B, L) of a language model; `weights` (B,) per example."""
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), -1)[..., 0]
  w = jnp.broadcast_to(weights.reshape(weights.shape + (1,) * (nll.ndim - 1)), nll.shape)
  return {'correct': jnp.sum(w * (predicted == targets)), 'loss': jnp.sum(w * nll),
          'count': jnp.sum(w)}


def error_and_loss(sums: dict) -> dict:
  return {'error': 1.0 - float(sums['correct']) / float(sums['count']),
          'loss': float(sums['loss']) / float(sums['count'])}


@jax.jit
def _keep_improved(improved, new, old):
  """Per member: `new` where it improved, else `old` (trees with a leading member axis)."""
  def pick(n, o):
    return jnp.where(improved.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
  return jax.tree.map(pick, new, old)


def validation_score(sums: dict, stop_on: str) -> np.ndarray:
  """Per member, what early stopping maximizes: validation accuracy, or minus the loss."""
  count = np.asarray(sums['count'])
  if stop_on == 'loss':
    return -np.asarray(sums['loss']) / count
  return np.asarray(sums['correct']) / count


def counted(flops: float | None) -> float:
  """A FLOP count for the history: NaN where the backend gave none (never a silent 0)."""
  return math.nan if flops is None else flops


def fit(trainer: steps.Trainer, validator: steps.Evaluator, variables, opt_state, data: placement.DataArrays,
        train: np.ndarray, valid: np.ndarray, key, train_config, flops: dict,
        weights: np.ndarray | None = None, progress=None,
        resample: bool = False, anchor=None) -> tuple[Any, Any, RoundReport]:
  """The common ALMA round for a stack of M members trained side by side.

  `variables` (the members' Flax variables) and `opt_state` have a leading member axis; `train` holds each member's training
  indices (M, n) (members may see different data, e.g. bootstrap samples), `weights` their
  example weights (default 1). Every epoch shuffles each member's data with its own key, then
  scores each member on `valid` (accuracy, or minus the loss: `train_config.stop_on`). A
  member's best-validation variables (and optimizer state) are kept; training stops once no
  member has improved on its best by more than `patience_delta` for `patience` epochs, or after
  `max_epochs`. `progress(epoch, scores)`, if given, is called after every epoch. With
  `resample`, epochs draw examples with replacement by weight; `anchor` goes to the trainer's
  penalty (see `steps.Trainer`). `flops` holds 'step' (one member's train step) and 'forward'
  (one member, one example), either may be None, and 'reference' (one member, one example).
  """
  members, n_train = train.shape
  train_idx, _ = steps.pad_indices(train, trainer.batch_size)
  example_weights = np.zeros(train_idx.shape, np.float32)
  example_weights[:, :n_train] = 1.0 if weights is None else weights
  keys = jax.random.split(key, members)
  best_score = np.full(members, -np.inf)
  bad_epochs = np.zeros(members, int)
  best, epochs = None, 0
  for epoch in range(train_config.max_epochs):
    variables, opt_state = trainer.train_epoch(
        variables, opt_state, data.train_images, data.train_labels, train_idx, example_weights,
        n_train, keys, epoch, resample, anchor)
    sums = validator.device_sums(variables, data.train_images, data.train_labels, valid)
    score = validation_score(jax.device_get(sums), train_config.stop_on)
    if progress is not None:
      progress(epoch, score)
    improved = score > best_score + train_config.patience_delta
    best_score = np.where(improved, score, best_score)
    bad_epochs = np.where(improved, 0, bad_epochs + 1)
    if best is None:
      best = trainer.copy((variables, opt_state))
    elif improved.any():
      best = _keep_improved(improved, (variables, opt_state), best)
    epochs = epoch + 1
    if np.all(bad_epochs >= train_config.patience):
      break
  steps_per_epoch = -(-n_train // trainer.batch_size)
  forward = counted(flops['forward']) * members
  report = RoundReport(
      epochs=epochs, steps=epochs * steps_per_epoch, train_examples=epochs * n_train * members,
      train_flops=counted(flops['step']) * members * epochs * steps_per_epoch,
      valid_flops=forward * epochs * len(valid),
      reference_flops=flops['reference'] * epochs * n_train * members)
  return *trainer.place(*best), report
