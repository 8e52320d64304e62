"""The MNIST multi-layer perceptron of the ALMA reference: input -> (Dense h, ReLU) x n -> classes."""
from __future__ import annotations

import flax.linen as nn

# PyTorch's nn.Linear default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which the reference
# uses; biases start at zero (ours).
torch_linear_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class MLP(nn.Module):
  hidden: int = 64
  num_layers: int = 2
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout or normalization: the same function in training and evaluation.
    x = x.reshape((x.shape[0], -1))
    for _ in range(self.num_layers):
      x = nn.relu(nn.Dense(self.hidden, kernel_init=torch_linear_init)(x))
    return nn.Dense(self.num_classes, kernel_init=torch_linear_init)(x)
