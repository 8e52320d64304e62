"""ALMA on MNIST (TFDS catalog `mnist`) with the reference code's defaults.

Needs the prepared TFDS data set (internet and TensorFlow the first time).
Variants: `--config=configs/mnist.py:tiny` is a seconds-long smoke run.
"""
from alma_jax import config as alma_config


def get_config(variant: str = ''):
  c = alma_config.base()
  c.data.update(source='tfds', name='mnist')
  return alma_config.apply_variants(c, variant, 'configs/mnist.py')
