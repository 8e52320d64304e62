"""The VGG of the ALMA reference: VGG-19's layout with every convolution `width` channels wide
(crlapi/sl/architectures/vgg.py:55-90).

16 convolutions (3x3, padding 1, with bias), each followed by BatchNorm and ReLU, and 5 max-pools
(after convolutions 2, 4, 8, 12 and 16), then Linear(width, classes) on the 1x1 map that a 32x32
input leaves. Parameters: 135 c^2 + 85 c + 10 for RGB inputs and 10 classes (c=16: 35,930).
Initialization and BatchNorm follow PyTorch's defaults (momentum 0.1, eps 1e-5), as the reference.
"""
from __future__ import annotations

import flax.linen as nn

from alma_jax.models.layers import Conv, Linear, batch_norm

# Convolutions per block; a max-pool closes each block (VGG-19: 2, 2, 4, 4, 4).
VGG19_BLOCKS = (2, 2, 4, 4, 4)


def check_image_size(x, blocks: int) -> None:
  """Raises ValueError if images `x` (B, H, W, C) are too small for `blocks` 2x2 max-pools."""
  smallest = 2 ** blocks
  if min(x.shape[1:3]) < smallest:
    raise ValueError(f'a VGG halves its inputs {blocks} times: images of {x.shape[1]}x'
                     f'{x.shape[2]} are too small (set config.data.pad_to={smallest}, or fewer '
                     f'model.blocks)')


class ConvBlock(nn.Module):
  """`convs` x (3x3 convolution, BatchNorm, ReLU), then a 2x2 max-pool."""
  width: int
  convs: int

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    for _ in range(self.convs):
      x = nn.relu(batch_norm(train)(Conv(self.width)(x), mask=mask))
    return nn.max_pool(x, (2, 2), (2, 2))


class VGG(nn.Module):
  width: int = 16
  blocks: tuple[int, ...] = VGG19_BLOCKS
  num_classes: int = 10

  @classmethod
  def check_config(cls, keys: dict) -> None:
    """Raises ValueError unless `blocks` holds at least one block of at least one convolution."""
    if not keys['blocks'] or min(keys['blocks']) < 1:
      raise ValueError(f'config.model.blocks={keys["blocks"]!r}: must be a non-empty tuple of '
                       f'convolution counts >= 1')

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    """`mask` (B, 1, 1, 1): the examples whose statistics BatchNorm uses in training."""
    check_image_size(x, len(self.blocks))
    for convs in self.blocks:
      x = ConvBlock(self.width, convs)(x, train, mask)
    return Linear(self.num_classes)(x.reshape((x.shape[0], -1)))

  def neuron_layers(self) -> list[tuple[tuple[str, ...], tuple[str, ...] | None]]:
    """(kernel path, BatchNorm path) of every layer in forward order, the head last."""
    return [((f'ConvBlock_{b}', f'Conv_{i}'), (f'ConvBlock_{b}', f'BatchNorm_{i}'))
            for b, convs in enumerate(self.blocks) for i in range(convs)] + [(('Linear_0',), None)]
