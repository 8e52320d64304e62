"""The VGG of the ALMA reference: VGG-19's layout with every convolution `width` channels wide.

16 convolutions (3x3, padding 1, with bias), each followed by BatchNorm and ReLU, and 5 max-pools
(after convolutions 2, 4, 8, 12 and 16), then Linear(width, classes) on the 1x1 map that a 32x32
input leaves. Parameters: 135 c^2 + 85 c + 10 for RGB inputs and 10 classes (c=16: 35,930).
Initialization and BatchNorm follow PyTorch's defaults (momentum 0.1, eps 1e-5), as the reference.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from alma_jax.models.mlp import Linear

# Convolutions per block; a max-pool closes each block (VGG-19: 2, 2, 4, 4, 4).
VGG19_BLOCKS = (2, 2, 4, 4, 4)


class Conv3x3(nn.Module):
  """A 3x3 convolution (padding 1) initialized as PyTorch's nn.Conv2d."""
  features: int

  @nn.compact
  def __call__(self, x):
    fan_in = 9 * x.shape[-1]
    bound = fan_in ** -0.5
    init = lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound)
    kernel = self.param('kernel', init, (3, 3, x.shape[-1], self.features))
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + self.param('bias', init, (self.features,))


class ConvBlock(nn.Module):
  """`convs` x (Conv3x3, BatchNorm, ReLU), then a 2x2 max-pool."""
  width: int
  convs: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    for _ in range(self.convs):
      x = Conv3x3(self.width)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
      x = nn.relu(x)
    return nn.max_pool(x, (2, 2), (2, 2))


class VGG(nn.Module):
  width: int = 16
  blocks: tuple[int, ...] = VGG19_BLOCKS
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for convs in self.blocks:
      x = ConvBlock(self.width, convs)(x, train)
    return Linear(self.num_classes)(x.reshape((x.shape[0], -1)))
