"""Learners by config name. Each is a small module of pure functions over its own state.

Most learners are a stack of members of one model (`members.MemberLearner`) that differ only by
their `Plan`: which members a round trains, on what, and how members combine.
"""
from __future__ import annotations

from alma_jax import models
from alma_jax.learners import agg_ensemble, bagging, boosting, firefly, gens, k_ensemble, members
from alma_jax.learners import moe
from alma_jax.learners import single

_PLANS = {
    'finetune': single.finetune,
    'from_scratch': single.from_scratch,
    'k_ensemble': k_ensemble.k_ensemble,
    'gens': gens.gens,
    'bagging': bagging.bagging,
    'boosting': boosting.boosting,
    'agg_ensemble': agg_ensemble.agg_ensemble,
    'moe': moe.moe,
    'gmoe': moe.gmoe,
    'firefly': firefly.firefly,
}


def names() -> tuple[str, ...]:
  return tuple(_PLANS)


def create(config, dataset, data, mesh):
  """The learner that `config.learner.name` names, over `dataset` (already on the devices)."""
  plan = _PLANS[config.learner.name](config.learner)
  model = plan.model(models.build(config.model, dataset.num_classes))
  return members.MemberLearner(config, dataset, data, mesh, plan, model)
