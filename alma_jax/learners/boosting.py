"""Boosting (SAMME, multi-class AdaBoost): one member per round, trained on re-weighted examples.

SAMME, over the members in order, from uniform example weights w: eps_m = sum(w * miss_m) /
sum(w), alpha_m = log((1 - eps_m) / eps_m) + log(C - 1), w *= exp(alpha_m * miss_m). The new
member trains on the round's data drawn by the weights SAMME leaves on it (sampling; reference:
crlapi/sl/clmodels/boosting.py:214-232 for SAMME, 35-52 for the draw); then every member's
alpha is recomputed by SAMME on the round's validation split (boosting.py:398-411). Prediction:
the alpha-weighted sum of the members' logits. The new member starts as a copy of the last, or
fresh (`learner.new_member`).
SAMME's passes (every member forward over the round's training data, then over its validation
split) count as training FLOPs, as gMoE's measuring does: a round costs more with every member.
The first round trains on ordinary shuffled epochs, as the reference
(crlapi/sl/clmodels/boosting.py:277-281: no sampler for the first task).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alma_jax import sharding, steps
from alma_jax.learners import base, gens, members


@functools.partial(jax.jit, static_argnums=0)
def _member_mistakes(apply_fn, variables, images, labels):
  """(M, B) 1.0 where member m misclassifies example b."""
  logits = jax.vmap(apply_fn, (0, None))(variables, images)
  return (jnp.argmax(logits, -1) != labels).astype(jnp.float32)


def mistakes(learner, variables, indices: np.ndarray) -> np.ndarray:
  """(M, n) 1.0 where member m of `variables` misclassifies training example indices[i]."""
  m = jax.tree.leaves(variables)[0].shape[0]
  padded, _ = learner.padded(variables, jnp.zeros(m, jnp.float32))
  blocks, n = steps.blocks(indices, learner.config.train.eval_batch_size)
  miss = [_member_mistakes(learner.apply_fn, padded, *learner.data.batch(b, learner.trainer.mesh))
          for b in blocks]  # all dispatched before the first is read back
  return np.concatenate([sharding.to_host(x) for x in miss], axis=1)[:m, :n]


def samme(miss: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(alphas (M,), example weights (n,) normalized to mean 1) of members with mistakes `miss`."""
  w = np.full(miss.shape[1], 1.0 / miss.shape[1])
  alphas = []
  for m in miss:
    eps = float(np.clip(np.sum(w * m) / np.sum(w), 1e-6, 1 - 1e-6))
    alphas.append(np.log((1 - eps) / eps) + np.log(num_classes - 1))
    w = w * np.exp(alphas[-1] * m)
    w = w / np.sum(w)
  return np.asarray(alphas, np.float32), (w * len(w)).astype(np.float32)


def boosting(config) -> members.Plan:
  start = gens.new_member_start(config)

  def work(learner, state, round, key):
    first = int(state.rounds) == 0
    weights = None if first else samme(mistakes(learner, state.variables, round.train),
                                       learner.num_classes)[1][None]
    frozen = 0 if first else learner.num_members(state)  # the untrained start is replaced
    forward = base.counted(learner.flops(state.variables)['forward'])
    samme_flops = forward * (frozen * len(round.train) + (frozen + 1) * len(round.valid))
    return members.Work(start=start(learner, state, key, 1), train=members.same_data(round, 1),
                        weights=weights, resample=not first, extra_flops=samme_flops)

  def merge(learner, state, variables, work, round):
    state = members.append(learner, state, variables, work, round)
    alphas, _ = samme(mistakes(learner, state.variables, round.valid), learner.num_classes)
    return state.replace(member_weights=jnp.asarray(alphas))

  return members.Plan(1, work, merge, members.weighted_logits)
