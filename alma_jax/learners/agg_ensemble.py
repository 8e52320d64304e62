"""agg-ensemble: k members trained as one model through the loss of the sum of their logits.

The members are coupled by the loss, so the learner is a single (warm-started) model whose
module is `models.Aggregate` of k copies of the configured model; prediction = sum of logits.
"""
from __future__ import annotations

import dataclasses

from alma_jax import models
from alma_jax.learners import members, single


def agg_ensemble(config) -> members.Plan:
  plan = single.finetune(config)
  return dataclasses.replace(plan, model=lambda module: models.Aggregate(module, config.num_members))
