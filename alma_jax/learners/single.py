"""One model: `finetune` (warm-started from the previous round) and `from_scratch` (tabula rasa)."""
from __future__ import annotations

from alma_jax.learners import members


def warm_start(learner, state, round, key):
  """Every member continues from where the previous round left it, on the round's data."""
  del key
  count = learner.num_members(state)
  return members.Work(start=state.variables, train=members.same_data(round, count),
                      opt_state=state.opt_state)


def fresh_start(learner, state, round, key):
  """As many fresh members as the state holds, on the round's data."""
  count = learner.num_members(state)
  return members.Work(start=learner.new_members(key, count),
                      train=members.same_data(round, count))


def growing(grow_every: int, grow):
  """The work of one model that is grown after every `grow_every` rounds trained (never before
  the first, as the reference) and trains on with a fresh optimizer, warm-started otherwise.
  `grow(learner, state, round, key)` -> (the member's grown variables, unstacked; the FLOPs
  spent deciding how)."""
  def work(learner, state, round, key):
    rounds = int(state.rounds)
    if rounds == 0 or rounds % grow_every:
      return warm_start(learner, state, round, key)
    grown, flops = grow(learner, state, round, key)
    return members.Work(start=members.as_stack(grown), train=members.same_data(round, 1),
                        extra_flops=flops)
  return work


def finetune(config) -> members.Plan:
  del config
  return members.Plan(1, warm_start, members.replace, members.mean_logits)


def from_scratch(config) -> members.Plan:
  del config
  return members.Plan(1, fresh_start, members.replace, members.mean_logits)
