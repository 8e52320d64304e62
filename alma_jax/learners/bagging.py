"""Bagging: every round adds k members, each trained on bootstrap resamples of the round's data.

Every epoch, each new member draws as many examples as the round has, with replacement
(reference: crlapi/sl/clmodels/bagging.py:55, its `subsample_p` 1.0 in
configs/mnist/bagging.yaml:25). New members start as copies of the last k members (the
reference's `self.models[-i] for i in range(k)`, bagging.py:92, copies the first and the last
k - 1: a departure docs/configuration.md lists). Validation stays the round's held-out split.
Prediction: mean of the members' logits (bagging.py:77).
"""
from __future__ import annotations

from alma_jax.learners import members


def bagging(config) -> members.Plan:
  k = config.num_members

  def work(learner, state, round, key):
    del key
    return members.Work(start=learner.member(state.variables, -k, k),
                        train=members.same_data(round, k), resample=True)

  return members.Plan(k, work, members.append, members.mean_logits)
