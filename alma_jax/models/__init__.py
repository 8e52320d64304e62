"""Flax (Linen) models, built from the `model` section of a config."""
from __future__ import annotations

import dataclasses

from alma_jax.models.aggregate import Aggregate
from alma_jax.models.mlp import MLP
from alma_jax.models.resnet import ResNet18
from alma_jax.models.transformer import Transformer
from alma_jax.models.vgg import VGG

__all__ = ['Aggregate', 'MIXTURES', 'MLP', 'ResNet18', 'Transformer', 'VGG', 'build', 'check',
           'defaults', 'names', 'register']

_MODELS = {'mlp': MLP, 'vgg': VGG, 'resnet18': ResNet18, 'transformer': Transformer}
# Mixture-of-experts versions (models/moe.py): the keys of their base model, and num_experts.
MIXTURES = {'moe_mlp': 'mlp', 'moe_vgg': 'vgg'}
NUM_EXPERTS = 2


def register(name: str, module_class) -> None:
  """Makes `config.model.name=name` build `module_class(num_classes=..., **the model's keys)`, a
  Flax Linen module whose keyword fields with defaults are the keys a config may set, called as
  `(x, train=...)`, and with `mask=` (the batch's real examples) if it has collections besides
  `params`. A classmethod `check_config(keys)` of the class, if it has one, checks the model's
  keys with the config (raising ValueError)."""
  _MODELS[name] = module_class


def names() -> tuple[str, ...]:
  return tuple(_MODELS) + tuple(MIXTURES)


def build(config, num_classes: int):
  """The model that `config` (the `model` section) names: a Flax module, or a `moe.Mixture`."""
  check(config)
  kwargs = {k: v for k, v in config.items() if k != 'name'}
  if config.name in MIXTURES:
    from alma_jax.models import moe
    experts = kwargs.pop('num_experts', NUM_EXPERTS)
    return moe.mixture_of(_MODELS[MIXTURES[config.name]](num_classes=num_classes, **kwargs),
                          experts)
  return _MODELS[config.name](num_classes=num_classes, **kwargs)


def defaults(name: str) -> dict:
  """The keys of model `name` that a config may leave out, with the values the model then uses."""
  if name in MIXTURES:
    return {**defaults(MIXTURES[name]), 'num_experts': NUM_EXPERTS}
  if name not in _MODELS:
    return {}
  return {f.name: f.default for f in dataclasses.fields(_MODELS[name])
          if f.default is not dataclasses.MISSING and f.name not in ('parent', 'name')
          and f.init and f.name != 'num_classes'}


def check(config) -> None:
  """Raises ValueError naming the first key of `config` (the `model` section) that its model
  does not have or that is out of range."""
  if config.name not in names():
    raise ValueError(f'config.model.name={config.name!r}: must be one of {sorted(names())}')
  known = defaults(config.name)
  for key, value in config.items():
    if key == 'name':
      continue
    if key not in known:
      raise ValueError(f'config.model.{key}={value!r}: model {config.name!r} has no key {key!r} '
                       f'(its keys: {", ".join(sorted(known))})')
    _check_value(f'config.model.{key}', value, known[key])
  model = _MODELS[MIXTURES.get(config.name, config.name)]
  if hasattr(model, 'check_config'):  # what only the model knows (a classmethod over its keys)
    model.check_config({**known, **{k: v for k, v in config.items() if k != 'name'}})


def _check_value(name: str, value, default) -> None:
  """Raises ValueError unless `value` is of the kind of the key's `default`: a whole number
  >= 1 where that is one, a tuple of whole numbers where it is one, a number where it is a
  float, a bool or string where it is one (other kinds are the model's to check)."""
  whole = lambda x: isinstance(x, int) and not isinstance(x, bool)
  if isinstance(default, tuple) and default and all(map(whole, default)):
    ok, kind = isinstance(value, (tuple, list)) and all(map(whole, value)), (
        'a tuple of whole numbers')
  elif isinstance(default, (bool, str)):
    ok, kind = isinstance(value, type(default)), type(default).__name__
  elif whole(default):
    ok, kind = whole(value) and value >= 1, 'a whole number >= 1'
  elif isinstance(default, float):
    ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), 'a number'
  else:
    ok, kind = True, ''
  if not ok:
    raise ValueError(f'{name}={value!r}: must be {kind}')
