"""ALMA on CIFAR-10 (TFDS `cifar10`) with the reference code's defaults.

VGG-19 layout of constant width 16 (about 36K parameters), SGD lr 0.01, momentum 0.9, weight
decay 1e-4, batch 128, random crop with padding 4 and horizontal flips. Needs the prepared TFDS
data set (internet and TensorFlow the first time).
Variants: `:tiny` is a smoke run; `:moe` (finetune over MoE-VGG), `:gmoe`, `:firefly` switch to
that model or learner with the reference's settings for it (Nesterov momentum, growth every 2 rounds); combine them with commas,
e.g. `:firefly,tiny`.
"""
import ml_collections

from alma_jax import config as alma_config


def get_config(variant: str = ''):
  c = alma_config.base()
  c.data.update(source='tfds', name='cifar10', mean=(0.4914, 0.4822, 0.4465),
                std=(0.2470, 0.2435, 0.2616), augmentation='crop_flip')
  c.model = ml_collections.ConfigDict(dict(name='vgg', width=16))
  c.optimizer.update(name='sgd', learning_rate=0.01, momentum=0.9, weight_decay=1e-4)
  return alma_config.apply_variants(c, variant, 'configs/cifar10.py', {
      'tiny': alma_config.tiny_vgg,
      **{name: alma_config.growing(name) for name in ('moe', 'gmoe', 'firefly')}})
