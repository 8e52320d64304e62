"""Optimizers by config name, through optax. The reference resets them every round (no schedule)."""
from __future__ import annotations

import optax


def _adadelta(c):
  # PyTorch's Adadelta defaults, which the reference used: rho 0.9, eps 1e-6.
  return optax.adadelta(c.learning_rate, rho=0.9, eps=1e-6, weight_decay=c.weight_decay)


def _sgd(c):
  # PyTorch-style coupled weight decay: the decay term is added to the gradient before momentum.
  return optax.chain(optax.add_decayed_weights(c.weight_decay),
                     optax.sgd(c.learning_rate, momentum=c.momentum or None, nesterov=c.nesterov))


def _adamw(c):
  return optax.adamw(c.learning_rate, weight_decay=c.weight_decay)


_OPTIMIZERS = {'adadelta': _adadelta, 'sgd': _sgd, 'adamw': _adamw}


def names() -> tuple[str, ...]:
  return tuple(_OPTIMIZERS)


def build(config) -> optax.GradientTransformation:
  """The optax optimizer that `config` (the `optimizer` section) names."""
  return _OPTIMIZERS[config.name](config)
