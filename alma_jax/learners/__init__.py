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


# Early stopping as the reference's configs ran each learner (configs/mnist/*.yaml), for the
# `train` keys a config leaves None. k-ensemble, agg-ensemble and bagging keep a member's best
# epoch on any strict improvement (crlapi/sl/clmodels/k_ensemble.py:171, agg_ensemble.py:163,
# bagging.py:196) and bagging never stops early (bagging.py:136-205): patience 100 = all of
# max_epochs 100. The reference's MoE-MLP (configs/mnist/test_finetune_moe.yaml) trains with
# patience 100.
TRAIN_DEFAULTS = {
    None: {'patience': 25, 'patience_delta': 0.001},
    'k_ensemble': {'patience': 100, 'patience_delta': 0.0},
    'agg_ensemble': {'patience': 100, 'patience_delta': 0.0},
    'bagging': {'patience': 100, 'patience_delta': 0.0},
    'moe': {'patience': 100},
}


def names() -> tuple[str, ...]:
  return tuple(_PLANS)


def with_defaults(config):
  """`config` with the `train` keys it leaves None set to its learner's defaults."""
  defaults = {**TRAIN_DEFAULTS[None], **TRAIN_DEFAULTS.get(config.learner.name, {})}
  missing = {k: v for k, v in defaults.items() if config.train[k] is None}
  if not missing:
    return config
  config = config.copy_and_resolve_references()
  config.train.update(missing)
  return config


def create(config, dataset, data, mesh):
  """The learner that `config.learner.name` names, over `dataset` (already on the devices)."""
  config = with_defaults(config)
  plan = _PLANS[config.learner.name](config.learner)
  model = plan.model(models.build(config.model, dataset.num_classes))
  return members.MemberLearner(config, dataset, data, mesh, plan, model)
