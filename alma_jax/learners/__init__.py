"""Learners by config name. Each is a small module of pure functions over its own state."""
from __future__ import annotations

import functools

from alma_jax.learners import single

_LEARNERS = {
    'finetune': functools.partial(single.SingleModel, warm_start=True),
    'from_scratch': functools.partial(single.SingleModel, warm_start=False),
}


def names() -> tuple[str, ...]:
  return tuple(_LEARNERS)


def create(config, dataset, data, mesh):
  """The learner that `config.learner.name` names, over `dataset` (already on the devices)."""
  return _LEARNERS[config.learner.name](config, dataset, data, mesh)
