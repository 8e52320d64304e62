"""Flax (Linen) models, built from the `model` section of a config."""
from __future__ import annotations

import dataclasses

from alma_jax.models.aggregate import Aggregate
from alma_jax.models.mlp import MLP
from alma_jax.models.resnet import ResNet18
from alma_jax.models.transformer import Transformer
from alma_jax.models.vgg import VGG

__all__ = ['Aggregate', 'MLP', 'ResNet18', 'Transformer', 'VGG', 'build', 'defaults', 'names']

_MODELS = {'mlp': MLP, 'vgg': VGG, 'resnet18': ResNet18, 'transformer': Transformer}


def names() -> tuple[str, ...]:
  return tuple(_MODELS)


def build(config, num_classes: int):
  """The Flax module that `config` (the `model` section) names."""
  if config.name not in _MODELS:
    raise ValueError(f'config.model.name={config.name!r}: must be one of {sorted(_MODELS)}')
  kwargs = {k: v for k, v in config.items() if k != 'name'}
  return _MODELS[config.name](num_classes=num_classes, **kwargs)



def defaults(name: str) -> dict:
  """The keys of model `name` that a config may leave out, with the values the model then uses."""
  if name not in _MODELS:
    return {}
  return {f.name: f.default for f in dataclasses.fields(_MODELS[name])
          if f.default is not dataclasses.MISSING and f.name not in ('parent', 'name')
          and f.init and f.name != 'num_classes'}
