"""Optimizers by config name, through optax.

The reference resets the optimizer every round and uses no schedule (the default here). With
`warmup_steps` / `decay_steps` the learning rate warms up and decays within each round over
those many steps; with `round_schedule` it warms up over `warmup_fraction` of each round's
steps and decays by a cosine to 0 at the round's last possible step (`train.max_epochs` epochs),
whatever the round's size (a waiting time or replay makes rounds longer). Every round starts
its schedule (`start_round`): a continued optimizer (`learner.reset_optimizer=False`) keeps its
moments. A caller that trains epochs itself (`Trainer.train_epoch`) starts the round too
(`MemberLearner.start_round`): a round schedule that was never started is a round of one step.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
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
    if c.round_schedule and c[key]:
      fail(f'optimizer.{key}', c[key], 'counts steps, which optimizer.round_schedule measures '
           'in rounds: leave it 0 (the warm-up is optimizer.warmup_fraction of a round)')
  if not 0 <= c.warmup_fraction < 1:
    fail('optimizer.warmup_fraction', c.warmup_fraction, 'must be in [0, 1)')


class RoundScheduleState(NamedTuple):
  count: jax.Array  # steps taken in this round
  steps: jax.Array  # the steps the round may take (set by `start_round`)


def round_rate(count, steps, peak: float, warmup_fraction: float):
  """The learning rate at step `count` of a round of `steps`: from 0 up to `peak` over its
  first `warmup_fraction`, then a cosine down to 0 at its last step."""
  steps = jnp.maximum(steps, 1).astype(jnp.float32)
  warm = jnp.floor(warmup_fraction * steps)
  t = jnp.asarray(count, jnp.float32)
  progress = jnp.clip((t - warm) / jnp.maximum(steps - warm, 1.0), 0.0, 1.0)
  return jnp.where(t < warm, peak * t / jnp.maximum(warm, 1.0),
                   peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))


def _scale_by_round_schedule(peak: float, warmup_fraction: float):
  def init(params):
    del params
    return RoundScheduleState(jnp.zeros([], jnp.int32), jnp.ones([], jnp.int32))

  def update(updates, state, params=None):
    del params
    rate = round_rate(state.count, state.steps, peak, warmup_fraction)
    updates = jax.tree.map(lambda u: (rate * u).astype(u.dtype), updates)
    return updates, state._replace(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)


def start_round(opt_state, steps: int):
  """`opt_state` at the start of a round of at most `steps` steps: its schedule's count back at
  0 (the round's first step) and, for a round schedule, the round's length; everything else
  (moments, Adam's own count for bias correction) as it was."""
  schedules = (optax.ScaleByScheduleState, RoundScheduleState)

  def start(state):
    if isinstance(state, RoundScheduleState):
      return RoundScheduleState(np.zeros(np.shape(state.count), np.int32),
                                np.full(np.shape(state.steps), steps, np.int32))
    if isinstance(state, optax.ScaleByScheduleState):
      return state._replace(count=np.zeros(np.shape(state.count), state.count.dtype))
    return state
  return jax.tree.map(start, opt_state, is_leaf=lambda x: isinstance(x, schedules))


def learning_rate(c):
  """The constant rate, or warm-up then cosine decay (steps counted within a round)."""
  if not (c.warmup_steps or c.decay_steps):
    return c.learning_rate
  return optax.warmup_cosine_decay_schedule(
      0.0, c.learning_rate, c.warmup_steps, c.warmup_steps + (c.decay_steps or 10 ** 12))


def _adadelta(c, rate):
  # PyTorch's Adadelta defaults, which the reference used (configs/mnist/test_finetune_mlp.yaml:
  # 41-43, lr 1.0): rho 0.9, eps 1e-6.
  return optax.adadelta(rate, rho=0.9, eps=1e-6, weight_decay=c.weight_decay)


def _sgd(c, rate):
  # PyTorch-style coupled weight decay: the decay term is added to the gradient before momentum.
  return optax.chain(optax.add_decayed_weights(c.weight_decay),
                     optax.sgd(rate, momentum=c.momentum or None, nesterov=c.nesterov))


def _adamw(c, rate):
  return optax.adamw(rate, weight_decay=c.weight_decay)


_OPTIMIZERS = {'adadelta': _adadelta, 'sgd': _sgd, 'adamw': _adamw}


def names() -> tuple[str, ...]:
  return tuple(_OPTIMIZERS)


def build(config) -> optax.GradientTransformation:
  """The optax optimizer that `config` (the `optimizer` section) names. A round schedule scales
  the updates of the optimizer at rate 1 (each applies its rate last)."""
  if config.round_schedule:
    return optax.chain(_OPTIMIZERS[config.name](config, 1.0),
                       _scale_by_round_schedule(config.learning_rate, config.warmup_fraction))
  return _OPTIMIZERS[config.name](config, learning_rate(config))
