"""Boosting (SAMME, multi-class AdaBoost): one member per round, trained on re-weighted examples.

An example's weight is exp(sum of the alphas of the members that misclassify it), normalized to
mean 1, so the new member focuses on what the ensemble gets wrong. The new member's weight is
alpha = log((1 - eps) / eps) + log(C - 1), with eps its weighted error on the validation split.
Prediction: the alpha-weighted sum of the members' logits.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alma_jax import steps
from alma_jax.learners import gens, members


@functools.partial(jax.jit, static_argnums=(0, 5))
def _member_mistakes(apply_fn, params, images, labels, indices, block):
  """(M, n) 1.0 where member m misclassifies example indices[i] (indices padded to `block`)."""
  def one_block(idx):
    logits = jax.vmap(apply_fn, (0, None))(params, images[idx])
    return (jnp.argmax(logits, -1) != labels[idx]).astype(jnp.float32)
  mistakes = jax.lax.map(one_block, indices.reshape(-1, block))  # (blocks, M, block)
  return jnp.moveaxis(mistakes, 1, 0).reshape(mistakes.shape[1], -1)


def example_weights(learner, params, member_weights, indices: np.ndarray) -> np.ndarray:
  """SAMME weights of `indices` under the current members, normalized to mean 1."""
  block = learner.config.train.eval_batch_size
  padded, n = steps.pad_indices(indices, block)
  mistakes = _member_mistakes(learner.apply_fn, params, learner.data.train_images,
                              learner.data.train_labels, padded, block)
  score = np.asarray(jnp.einsum('m,mn->n', member_weights, mistakes))[:n]
  w = np.exp(score - score.max())
  return (w / w.mean()).astype(np.float32)


def member_alpha(learner, params, valid_weights, valid: np.ndarray, num_classes: int) -> float:
  """alpha = log((1 - eps) / eps) + log(C - 1) of one new member on the weighted validation set."""
  block = learner.config.train.eval_batch_size
  padded, n = steps.pad_indices(valid, block)
  mistakes = np.asarray(_member_mistakes(learner.apply_fn, params, learner.data.train_images,
                                         learner.data.train_labels, padded, block))[0, :n]
  eps = float(np.clip(np.sum(valid_weights * mistakes) / np.sum(valid_weights), 1e-6, 1 - 1e-6))
  return float(np.log((1 - eps) / eps) + np.log(num_classes - 1))


def boosting(config) -> members.Plan:
  start = gens.new_member_start(config)

  def work(learner, state, round, key):
    first = int(state['rounds']) == 0
    weights = (np.ones(len(round.train), np.float32) if first else
               example_weights(learner, state['params'], state['member_weights'], round.train))
    return members.Work(start=start(learner, state, key, 1), train=members.same_data(round, 1),
                        weights=weights[None])

  def merge(learner, state, params, work, round):
    del work
    first = int(state['rounds']) == 0
    valid_weights = (np.ones(len(round.valid), np.float32) if first else
                     example_weights(learner, state['params'], state['member_weights'],
                                     round.valid))
    alpha = member_alpha(learner, params, valid_weights, round.valid, learner.num_classes)
    return members.append(learner, state, params, None, round,
                          weights=jnp.asarray([alpha], jnp.float32))

  return members.Plan(1, work, merge, members.weighted_logits)
