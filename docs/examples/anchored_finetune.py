"""An example learner from outside alma_jax: finetune whose training loss adds an L2 penalty
toward the parameters the previous round ended with (`learner.anchor_strength` times the squared
distance), the simplest regularization-based continual learner (EWC with a unit Fisher).

Importing this module registers it; a config names it in `extensions` so that every process that
runs or reads back the run imports it (docs/extending.md).
"""
import dataclasses

import jax
import jax.numpy as jnp

from alma_jax import learners
from alma_jax.learners import members, single


def anchored_finetune(config) -> members.Plan:
  strength = config.get('anchor_strength', 0.01)

  def work(learner, state, round, key):
    """Finetune's round, anchored at the parameters the state holds (unanchored at first)."""
    start = single.warm_start(learner, state, round, key)
    weight = 0.0 if int(state.rounds) == 0 else strength
    members_count = learner.num_members(state)
    return dataclasses.replace(start, anchor={'params': state.variables['params'],
                                              'strength': jnp.full(members_count, weight)})

  def penalty(params, anchor):
    """One member's penalty (the anchor is that member's slice)."""
    squared = sum(jnp.sum((p - a) ** 2) for p, a in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(anchor['params'])))
    return anchor['strength'] * squared

  return dataclasses.replace(single.finetune(config), work=work, penalty=penalty)


learners.register('anchored_finetune', anchored_finetune,
                  train_defaults={'patience': 25, 'patience_delta': 0.001})
