"""The MNIST multi-layer perceptron of the ALMA reference: input -> (Linear h, ReLU) x n -> classes."""
from __future__ import annotations

import flax.linen as nn
import jax


def torch_linear_params(key, fan_in: int, fan_out: int) -> dict:
  """PyTorch's default nn.Linear init, which the reference uses: U(+-1/sqrt(fan_in)) for both."""
  bound = fan_in ** -0.5
  kernel_key, bias_key = jax.random.split(key)
  return {'kernel': jax.random.uniform(kernel_key, (fan_in, fan_out), minval=-bound, maxval=bound),
          'bias': jax.random.uniform(bias_key, (fan_out,), minval=-bound, maxval=bound)}


class Linear(nn.Module):
  """A dense layer initialized as PyTorch's nn.Linear."""
  features: int

  @nn.compact
  def __call__(self, x):
    bound = x.shape[-1] ** -0.5
    init = lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound)
    kernel = self.param('kernel', init, (x.shape[-1], self.features))
    return x @ kernel + self.param('bias', init, (self.features,))


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
