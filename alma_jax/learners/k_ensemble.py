"""k-ensemble: k members trained together on the same data, each with its own shuffling.

Training the stack with the sum of the members' losses is training each member on its own loss,
which is what the vmapped epoch does. Each member keeps its own best-validation parameters; the
prediction is the mean of the members' probabilities, or with `learner.prediction='vote'` their
majority vote (reference: crlapi/sl/clmodels/k_ensemble.py:39-60). Members are warm-started every
round.
"""
from __future__ import annotations

from alma_jax.learners import members, single


def k_ensemble(config) -> members.Plan:
  combine = members.majority_vote if config.prediction == 'vote' else members.mean_probs
  return members.Plan(config.num_members, single.warm_start, members.replace, combine)
