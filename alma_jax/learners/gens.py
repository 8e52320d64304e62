"""gEns, the growing ensemble: every round trains one new member on that round's data.

Older members stay frozen. The new member starts as a copy of the last member
(`learner.new_member='copy'`) or fresh (`'fresh'`); the first round trains the initial member.
Prediction: mean of the members' logits (`learner.prediction='mean_logits'`) or their majority
vote (`'vote'`, as k-ensemble's; see `members.majority_vote`).
"""
from __future__ import annotations

from alma_jax.learners import members

PREDICTIONS = {'mean_logits': members.mean_logits, 'vote': members.majority_vote}


def new_member_start(config):
  """The start of a round's new members: the last member copied, or fresh ones."""

  def start(learner, state, key, count):
    if config.new_member == 'fresh' and int(state.rounds) > 0:
      return learner.new_members(key, count)
    last = learner.member(state.variables, -1)
    return learner.repeat(last, count)

  return start


def gens(config) -> members.Plan:
  start = new_member_start(config)

  def work(learner, state, round, key):
    return members.Work(start=start(learner, state, key, 1), train=members.same_data(round, 1))

  return members.Plan(1, work, members.append, PREDICTIONS[config.prediction])
