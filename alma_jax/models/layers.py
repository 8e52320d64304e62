"""Dense and convolution layers initialized as PyTorch's defaults, which the reference uses:
weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
from __future__ import annotations

import flax.linen as nn
import jax


def torch_uniform(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def torch_linear_params(key, fan_in: int, fan_out: int) -> dict:
  """A Linear layer's parameters as a plain dict (for models built outside Linen)."""
  kernel_key, bias_key = jax.random.split(key)
  init = torch_uniform(fan_in)
  return {'kernel': init(kernel_key, (fan_in, fan_out)), 'bias': init(bias_key, (fan_out,))}


class Linear(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    init = torch_uniform(x.shape[-1])
    kernel = self.param('kernel', init, (x.shape[-1], self.features))
    return x @ kernel + self.param('bias', init, (self.features,))


class Conv(nn.Module):
  """A square convolution with 'SAME' padding (NHWC)."""
  features: int
  size: int = 3
  stride: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    init = torch_uniform(self.size * self.size * x.shape[-1])
    kernel = self.param('kernel', init, (self.size, self.size, x.shape[-1], self.features))
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + self.param('bias', init, (self.features,)) if self.use_bias else y


def batch_norm(train: bool):
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
