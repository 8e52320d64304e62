"""Learners by config name: a registry that a user's own module can extend (`register`).

A learner is a small module of pure functions over its own state. Most are a stack of members of
one model (`members.MemberLearner`) that differ only by their `Plan`: which members a round
trains, on what, and how members combine. The member model is an independent choice
(`config.model.name`: mlp, vgg, resnet18, transformer, moe_mlp, moe_vgg); a learner that works
only with some models says which, and other pairs are refused before any work.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from alma_jax import config as alma_config, models
from alma_jax.learners import agg_ensemble, bagging, boosting, firefly, gens, k_ensemble, members
from alma_jax.learners import moe, single


@dataclasses.dataclass(frozen=True)
class Registration:
  """plan(learner config) -> members.Plan.
  models: the member models it can train (None: any); refuses: models it cannot; why: said
  when a pair is refused. train_defaults(model name) -> {train key: value} for the keys a
  config leaves None. warm_optimizer: its plan's work continues the members' optimizer states
  (`Work.opt_state`) where `learner.reset_optimizer=False` asks (others refuse that setting).
  reads: the `OPTIONS` its plan reads (None: all); the others must stay at their defaults."""
  plan: Callable[..., members.Plan]
  models: tuple[str, ...] | None = None
  why: str = ''
  train_defaults: Callable[[str], dict] = lambda model: {}
  refuses: tuple[str, ...] = ()
  warm_optimizer: bool = False
  reads: tuple[str, ...] | None = None


_LEARNERS: dict[str, Registration] = {}

# Early stopping when neither the config nor the learner says (the reference's common setting:
# configs/mnist/test_finetune_mlp.yaml:38-39).
TRAIN_DEFAULTS = {'patience': 25, 'patience_delta': 0.001}


# The `learner` keys that only some learners read (name and reset_optimizer concern all).
OPTIONS = ('num_members', 'new_member', 'prediction', 'grow_every', 'growth', 'growth_rate',
           'new_neurons')


def register(name: str, plan, models=None, why: str = '', train_defaults=None,
             refuses=(), warm_optimizer: bool = False, reads=None) -> None:
  """Makes `config.learner.name=name` train with `plan` (see Registration)."""
  defaults = train_defaults if callable(train_defaults) else (
      lambda model, d=dict(train_defaults or {}): d)
  unknown = set(reads or ()) - set(OPTIONS)
  if unknown:
    raise ValueError(f'learner {name!r} reads {sorted(unknown)}: not among {OPTIONS}')
  _LEARNERS[name] = Registration(plan, tuple(models) if models else None, why, defaults,
                                 tuple(refuses), warm_optimizer,
                                 None if reads is None else tuple(reads))


def names() -> tuple[str, ...]:
  return tuple(_LEARNERS)


def warm_optimizer(name: str) -> bool:
  """Whether learner `name` can continue its members' optimizer states across rounds."""
  entry = _LEARNERS.get(name)
  return bool(entry and entry.warm_optimizer)


def unread_options(name: str) -> tuple[str, ...]:
  """The `OPTIONS` that learner `name` does not read."""
  entry = _LEARNERS.get(name)
  reads = OPTIONS if entry is None or entry.reads is None else entry.reads
  return tuple(k for k in OPTIONS if k not in reads)


def check(c) -> None:
  """Raises ValueError naming the first bad key of the `learner` section."""
  fail = alma_config.fail
  if c.name == 'moe':
    fail('learner.name', 'moe', "a fixed mixture of experts is now a model: set "
         "model.name='moe_mlp' (or 'moe_vgg') and learner.name='finetune' (or any learner)")
  if c.name not in _LEARNERS:
    fail('learner.name', c.name, f'must be one of {sorted(_LEARNERS)}')
  if not c.reset_optimizer and not _LEARNERS[c.name].warm_optimizer:
    warm = sorted(n for n, r in _LEARNERS.items() if r.warm_optimizer)
    fail('learner.reset_optimizer', c.reset_optimizer,
         f'{c.name} trains new members every round, each with a fresh optimizer; the learners '
         f'that can continue an optimizer: {", ".join(warm)}')
  if c.num_members < 1:
    fail('learner.num_members', c.num_members, 'must be >= 1')
  if c.new_member not in ('copy', 'fresh'):
    fail('learner.new_member', c.new_member, "must be 'copy' or 'fresh'")
  if c.prediction not in ('mean_logits', 'vote'):
    fail('learner.prediction', c.prediction, "must be 'mean_logits' or 'vote'")
  if c.grow_every < 1:
    fail('learner.grow_every', c.grow_every, 'must be >= 1')
  if c.growth not in ('usage', 'random'):
    fail('learner.growth', c.growth, "must be 'usage' or 'random'")
  if c.growth_rate <= 0:
    fail('learner.growth_rate', c.growth_rate, 'must be > 0')
  if c.new_neurons < 0:
    fail('learner.new_neurons', c.new_neurons, 'must be >= 0')
  defaults = alma_config.base().learner
  for key in unread_options(c.name):
    if c[key] != defaults[key]:
      readers = sorted(n for n in _LEARNERS if key not in unread_options(n))
      fail(f'learner.{key}', c[key], f'{c.name} does not use it (leave it at '
           f'{defaults[key]!r}); the learners that do: {", ".join(readers)}')


def check_model(learner: str, model: str) -> None:
  """Raises ValueError naming both keys if `learner` cannot train members of `model`."""
  entry = _LEARNERS.get(learner)
  if entry is None:
    return
  if entry.models is not None and model not in entry.models:
    allowed = f'its models: {", ".join(entry.models)}'
  elif model in entry.refuses:
    allowed = f'not over {", ".join(entry.refuses)}'
  else:
    return
  raise ValueError(f'config.learner.name={learner!r} with config.model.name={model!r}: '
                   f'{entry.why or "not supported"}; {allowed}')


def with_defaults(config):
  """`config` with the `train` keys it leaves None set to its learner's defaults."""
  alma_config.import_extensions(config)
  entry = _LEARNERS.get(config.learner.name)
  own = entry.train_defaults(config.model.name) if entry else {}
  missing = {k: v for k, v in {**TRAIN_DEFAULTS, **own}.items() if config.train[k] is None}
  if not missing:
    return config
  config = config.copy_and_resolve_references()
  config.train.update(missing)
  return config


def create(config, dataset, data, mesh):
  """The learner that `config.learner.name` names, over `dataset` (already on the devices)."""
  config = with_defaults(config)
  check_model(config.learner.name, config.model.name)
  plan = _LEARNERS[config.learner.name].plan(config.learner)
  model = plan.model(models.build(config.model, dataset.num_classes))
  return members.MemberLearner(config, dataset, data, mesh, plan, model)


# The reference's early stopping per learner (its configs/mnist/*.yaml). k-ensemble,
# agg-ensemble and bagging keep a member's best epoch on any strict improvement
# (crlapi/sl/clmodels/k_ensemble.py:171, agg_ensemble.py:163, bagging.py:196) and bagging never
# stops early (bagging.py:136-205): patience 100 = all of max_epochs 100. Its MoE-MLP
# (configs/mnist/test_finetune_moe.yaml) trains with patience 100.
ALL_EPOCHS = {'patience': 100, 'patience_delta': 0.0}
register('finetune', single.finetune,
         train_defaults=lambda model: {'patience': 100} if model == 'moe_mlp' else {},
         warm_optimizer=True, reads=())
register('from_scratch', single.from_scratch, reads=())
register('k_ensemble', k_ensemble.k_ensemble, train_defaults=ALL_EPOCHS, warm_optimizer=True,
         reads=('num_members', 'prediction'))
register('gens', gens.gens, reads=('new_member', 'prediction'))
register('bagging', bagging.bagging, train_defaults=ALL_EPOCHS, reads=('num_members',))
register('boosting', boosting.boosting, why='SAMME weighs classification mistakes',
         refuses=('transformer',), reads=('new_member',))
register('agg_ensemble', agg_ensemble.agg_ensemble, None,
         'its members are copies of one Flax module, summed', ALL_EPOCHS,
         refuses=tuple(models.MIXTURES), warm_optimizer=True, reads=('num_members',))
register('gmoe', moe.gmoe, tuple(models.MIXTURES), 'it grows the experts of a mixture model',
         warm_optimizer=True, reads=('grow_every', 'growth'))
register('firefly', firefly.firefly, ('mlp', 'vgg'), 'it grows the neurons of a chain of layers',
         warm_optimizer=True, reads=('grow_every', 'growth_rate', 'new_neurons'))
