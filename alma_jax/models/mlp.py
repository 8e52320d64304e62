"""The MNIST multi-layer perceptron of the ALMA reference: input -> (Linear h, ReLU) x n -> classes
(crlapi/sl/architectures/mlp.py:12-33)."""
from __future__ import annotations

import flax.linen as nn

from alma_jax.models.layers import Linear


class MLP(nn.Module):
  hidden: int = 64
  num_layers: int = 2
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout or normalization: the same function in training and evaluation.
    x = x.reshape((x.shape[0], -1))
    for _ in range(self.num_layers):
      x = nn.relu(Linear(self.hidden)(x))
    return Linear(self.num_classes)(x)

  def neuron_layers(self) -> list[tuple[tuple[str, ...], None]]:
    """(kernel path, normalization path) of every layer in forward order, the head last."""
    return [((f'Linear_{i}',), None) for i in range(self.num_layers + 1)]
