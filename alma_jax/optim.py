"""Optimizers by config name, through optax.

The reference resets the optimizer every round and uses no schedule (the default here). With
`warmup_steps` / `decay_steps` the learning rate warms up and decays within each round: a fresh
optimizer state starts its step count at 0, and a continued one (`learner.reset_optimizer=False`)
has its schedule's count restarted (`restart_schedule`), its moments kept.
"""
from __future__ import annotations

import jax
import numpy as np
import optax


def check(c) -> None:
  """Raises ValueError naming the first bad key of the `optimizer` section."""
  from alma_jax.config import fail
  if c.name not in names():
    fail('optimizer.name', c.name, f'must be one of {sorted(names())}')
  if c.learning_rate <= 0:
    fail('optimizer.learning_rate', c.learning_rate, 'must be > 0')
  if c.weight_decay < 0:
    fail('optimizer.weight_decay', c.weight_decay, 'must be >= 0')
  if not 0 <= c.momentum < 1:
    fail('optimizer.momentum', c.momentum, 'must be in [0, 1)')
  for key in ('warmup_steps', 'decay_steps'):
    if c[key] < 0:
      fail(f'optimizer.{key}', c[key], 'must be >= 0')


def restart_schedule(opt_state):
  """`opt_state` with the step count of its learning-rate schedule back at 0 (the round's
  first step), everything else (moments, Adam's own count for bias correction) as it was."""
  def restart(state):
    if isinstance(state, optax.ScaleByScheduleState):
      return state._replace(count=np.zeros(np.shape(state.count), state.count.dtype))
    return state
  return jax.tree.map(restart, opt_state,
                      is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


def learning_rate(c):
  """The constant rate, or warm-up then cosine decay (steps counted within a round)."""
  if not (c.warmup_steps or c.decay_steps):
    return c.learning_rate
  return optax.warmup_cosine_decay_schedule(
      0.0, c.learning_rate, c.warmup_steps, c.warmup_steps + (c.decay_steps or 10 ** 12))


def _adadelta(c):
  # PyTorch's Adadelta defaults, which the reference used: rho 0.9, eps 1e-6.
  return optax.adadelta(learning_rate(c), rho=0.9, eps=1e-6, weight_decay=c.weight_decay)


def _sgd(c):
  # PyTorch-style coupled weight decay: the decay term is added to the gradient before momentum.
  return optax.chain(optax.add_decayed_weights(c.weight_decay),
                     optax.sgd(learning_rate(c), momentum=c.momentum or None,
                               nesterov=c.nesterov))


def _adamw(c):
  return optax.adamw(learning_rate(c), weight_decay=c.weight_decay)


_OPTIMIZERS = {'adadelta': _adadelta, 'sgd': _sgd, 'adamw': _adamw}


def names() -> tuple[str, ...]:
  return tuple(_OPTIMIZERS)


def build(config) -> optax.GradientTransformation:
  """The optax optimizer that `config` (the `optimizer` section) names."""
  return _OPTIMIZERS[config.name](config)
