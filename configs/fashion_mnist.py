"""ALMA on Fashion-MNIST from the Debian package `dataset-fashion-mnist`: offline, full size.

Variants: `--config=configs/fashion_mnist.py:tiny` is a seconds-long smoke run.
"""
from alma_jax import config as alma_config


def get_config(variant: str = ''):
  c = alma_config.base()
  c.data.update(source='idx', name='fashion_mnist', path='/usr/share/datasets/fashion-mnist',
                mean=(0.2860,), std=(0.3530,))
  return alma_config.apply_variants(c, variant, 'configs/fashion_mnist.py')
