"""ResNet-18 with the CIFAR stem (a 3x3 convolution, no max-pool), the larger model users expect.

Four stages of two basic blocks, `width`, 2, 4 and 8 x `width` channels wide (strides 1, 2, 2, 2),
global average pooling and a linear head. Convolutions have no bias (BatchNorm follows each);
a block whose shape changes gets a 1x1 convolution + BatchNorm shortcut. width=64 and 10 classes:
11,173,962 parameters.
"""
from __future__ import annotations

import flax.linen as nn

from alma_jax.models.layers import AdaptiveAvgPool, Conv, Linear, batch_norm


class BasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    conv = lambda size, stride: Conv(self.features, size, stride, use_bias=False)
    y = nn.relu(batch_norm(train)(conv(3, self.stride)(x), mask=mask))
    y = batch_norm(train)(conv(3, 1)(y), mask=mask)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = batch_norm(train)(conv(1, self.stride)(x), mask=mask)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  width: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    """`mask` (B, 1, 1, 1): the examples whose statistics BatchNorm uses in training."""
    x = nn.relu(batch_norm(train)(Conv(self.width, 3, 1, use_bias=False)(x), mask=mask))
    for stage, stride in enumerate((1, 2, 2, 2)):
      for block in range(2):
        x = BasicBlock(self.width * 2 ** stage, stride if block == 0 else 1)(x, train, mask)
    return Linear(self.num_classes)(AdaptiveAvgPool(1)(x).reshape(x.shape[0], -1))
