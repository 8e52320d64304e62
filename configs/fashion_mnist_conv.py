"""The convolutional path on real data offline: Fashion-MNIST padded to 32x32, VGG of width 16.

The reference code's CIFAR-10 training setup (SGD lr 0.01, momentum 0.9, weight decay 1e-4,
random crop with padding 4 and horizontal flips) on the Debian package's Fashion-MNIST. At most
10 epochs a round with patience 3 (ours), so a T=10 run fits a CPU.
Variants: `:tiny` is a smoke run; `:moe` (finetune over MoE-VGG), `:gmoe`, `:firefly` switch to
that model or learner with the reference's settings for it (Nesterov momentum, growth every 2 rounds); combine them with commas,
e.g. `:firefly,tiny`.
"""
import ml_collections

from alma_jax import config as alma_config


def get_config(variant: str = ''):
  c = alma_config.base()
  c.data.update(source='idx', name='fashion_mnist', path='/usr/share/datasets/fashion-mnist',
                mean=(0.2860,), std=(0.3530,), pad_to=32, augmentation='crop_flip')
  c.model = ml_collections.ConfigDict(dict(name='vgg', width=16))
  c.optimizer.update(name='sgd', learning_rate=0.01, momentum=0.9, weight_decay=1e-4)
  c.train.update(max_epochs=10, patience=3)
  return alma_config.apply_variants(c, variant, 'configs/fashion_mnist_conv.py', {
      'tiny': alma_config.tiny_vgg,
      **{name: alma_config.growing(name) for name in ('moe', 'gmoe', 'firefly')}})
