"""Bagging: every round adds k members, each trained on its own bootstrap resample of the round.

Validation stays the round's held-out split. Prediction: mean of the members' probabilities.
"""
from __future__ import annotations

import jax
import numpy as np

from alma_jax.learners import members


def bootstrap(train: np.ndarray, count: int, seed) -> np.ndarray:
  """`count` resamples of `train`, each of its size, drawn with replacement."""
  rng = np.random.default_rng(seed)
  return train[rng.integers(0, len(train), (count, len(train)))]


def bagging(config) -> members.Plan:
  k = config.num_members

  def work(learner, state, round, key):
    seed = np.asarray(jax.random.key_data(key)).tolist()
    return members.Work(start=learner.new_members(key, k), train=bootstrap(round.train, k, seed))

  return members.Plan(k, work, members.append, members.mean_probs)
