"""Firefly: one model whose layers grow wider by splitting neurons and adding new ones.

After every g = `learner.grow_every` rounds trained (before rounds g+1, 2g+1, ... counted from
1), with t the rounds trained so far, the model's current number of neurons n grows by
int(n * ((1 + r t) / (1 + r (t - 1)) - 1)), r = `learner.growth_rate`: the reference's rule
(crlapi/sl/clmodels/firefly.py:79-80, 241-246), which reaches 1 + r t times the start only when
it grows every round. The candidates (`models.firefly`) are scored as the reference does: all of
them are added at once, their perturbations are optimized for one pass over the round's training
data (RMSprop, with the reference's penalty), then each candidate's score is the gradient of the
training loss with respect to a scale on its perturbation, averaged over a second pass. The
lowest-scoring candidates (those whose growth lowers the loss most), over all layers together,
are grown. Between growths the model is fine-tuned like `finetune`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alma_jax import metrics, placement, sharding, steps
from alma_jax.learners import base, members, single
from alma_jax.models import firefly as firefly_model


def _batches(indices: np.ndarray, batch_size: int, key) -> np.ndarray:
  """The round's training indices in a random order, as full batches (at least one)."""
  order = np.asarray(jax.random.permutation(key, indices))
  count = max(len(order) // batch_size, 1)
  return order[:count * batch_size].reshape(count, -1)


def score(learner, variables, layers, cands, indices: np.ndarray, key):
  """(optimized candidates, [split scores, new-neuron scores] per layer, FLOPs spent)."""
  split_all = [np.arange(c['split'].shape[-1]) for c in cands]
  new_all = [np.arange(c['new_in'].shape[-1]) for c in cands]
  ones = ([jnp.ones(len(i)) for i in split_all], [jnp.ones(len(i)) for i in new_all])

  def loss(cands, gates, batch):
    images, labels = batch
    grown = firefly_model.grow(variables, layers, firefly_model.gated(cands, *gates), split_all,
                               new_all)
    logits = learner.apply_fn(grown, images)
    return jnp.mean(base.softmax_cross_entropy(logits, labels))

  def penalty(cands):
    return 1e-2 * sum(jnp.sum(c['split'] ** 2) + 1e-2 * jnp.sum(c['new_in'] ** 2) for c in cands)

  # PyTorch's RMSprop (clmodels/firefly.py:201): eps added to the root, not under it.
  optimizer = optax.rmsprop(1e-3, decay=0.9, momentum=0.1, eps_in_sqrt=False)

  @jax.jit
  def optimize_step(cands, opt_state, batch):
    grads = jax.grad(lambda c: loss(c, ones, batch) + penalty(c))(cands)
    updates, opt_state = optimizer.update(grads, opt_state, cands)
    return optax.apply_updates(cands, updates), opt_state

  gate_grads = jax.jit(jax.grad(loss, argnums=1))
  rows = _batches(indices, learner.config.train.batch_size, key)
  mesh = learner.trainer.mesh
  batches = lambda: placement.prefetched(lambda i: learner.data.batch(rows[i], mesh), len(rows),
                                         learner.config.data.prefetch)
  opt_state = jax.jit(optimizer.init)(cands)
  for batch in batches():
    cands, opt_state = optimize_step(cands, opt_state, batch)
  totals = None
  for batch in batches():
    grads = gate_grads(cands, ones, batch)
    totals = grads if totals is None else steps.tree_add(totals, grads)
  scores = jax.tree.map(lambda t: sharding.to_host(t) / len(rows), totals)
  flops = len(rows) * sum(  # every batch is full: the last one stands for all
      base.counted(metrics.cost_flops(f, *args))
      for f, args in ((optimize_step, (cands, opt_state, batch)),
                      (gate_grads, (cands, ones, batch))))
  return cands, scores, flops


def neurons_to_add(neurons: int, rounds: int, growth_rate: float) -> int:
  """How many neurons a model of `neurons` gains after `rounds` rounds trained: the reference's
  growth ratio and truncation, in its order of operations
  (crlapi/sl/clmodels/firefly.py:79-80, 246); its threshold then grows one more
  (docs/configuration.md)."""
  ratio = (growth_rate * rounds + 1) / (growth_rate * (rounds - 1) + 1) - 1
  return int(neurons * ratio)


# One compiled program for a whole tree (each eager op would compile once per leaf shape).
_candidates = jax.jit(firefly_model.candidates, static_argnums=(2, 3))
_grown = jax.jit(firefly_model.grow, static_argnums=1)


def grow(learner, variables, indices: np.ndarray, rounds: int, key, config):
  """One member's `variables` grown after `rounds` rounds trained, and the FLOPs spent choosing."""
  layers = learner.model.neuron_layers()
  count = neurons_to_add(firefly_model.neurons(variables, layers), rounds, config.growth_rate)
  if count <= 0:
    return variables, 0.0
  cand_key, order_key = jax.random.split(key)
  cands = _candidates(cand_key, variables, tuple(layers), config.new_neurons)
  cands, (split_scores, new_scores), flops = score(learner, variables, layers, cands, indices,
                                                   order_key)
  flat = np.concatenate(split_scores + new_scores)
  chosen = np.zeros(len(flat), bool)
  chosen[np.argsort(flat, kind='stable')[:count]] = True
  sizes = [len(s) for s in split_scores + new_scores]
  picks = [np.flatnonzero(c) for c in np.split(chosen, np.cumsum(sizes)[:-1])]
  half = len(split_scores)
  return _grown(variables, tuple(layers), cands, picks[:half], picks[half:]), flops


def firefly(config) -> members.Plan:
  def grow_model(learner, state, round, key):
    return grow(learner, members.first_member(state.variables), round.train, int(state.rounds),
                key, config)

  return members.Plan(1, single.growing(config.grow_every, grow_model), members.replace,
                      members.mean_logits, check=lambda learner, member: (
                          firefly_model.check_chain(member, learner.model.neuron_layers())))
