"""Dense and convolution layers initialized as PyTorch's defaults, which the reference uses:
weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

A layer's width is the width of the parameters it is given: `features` sets it only at
initialization. So a network whose layers grew (Firefly) runs with the same module.
"""
from __future__ import annotations

import contextlib
import contextvars

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_uniform(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def torch_linear_params(key, fan_in: int, fan_out: int) -> dict:
  """A Linear layer's parameters as a plain dict (for models built outside Linen)."""
  kernel_key, bias_key = jax.random.split(key)
  init = torch_uniform(fan_in)
  return {'kernel': init(kernel_key, (fan_in, fan_out)), 'bias': init(bias_key, (fan_out,))}


def _width(module: nn.Module, features: int) -> int:
  """The output width of `module`'s existing kernel, else `features` (initialization)."""
  if module.has_variable('params', 'kernel'):
    return module.get_variable('params', 'kernel').shape[-1]
  return features


class Linear(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    init = torch_uniform(x.shape[-1])
    features = _width(self, self.features)
    kernel = self.param('kernel', init, (x.shape[-1], features))
    return x @ kernel + self.param('bias', init, (features,))


class Conv(nn.Module):
  """A square convolution with 'SAME' padding (NHWC)."""
  features: int
  size: int = 3
  stride: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    init = torch_uniform(self.size * self.size * x.shape[-1])
    features = _width(self, self.features)
    kernel = self.param('kernel', init, (self.size, self.size, x.shape[-1], features))
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + self.param('bias', init, (features,)) if self.use_bias else y


def batch_norm(train: bool):
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class AdaptiveAvgPool(nn.Module):
  """(B, H, W, C) average-pooled to (B, size, size, C), as PyTorch's AdaptiveAvgPool2d(size) for
  sizes that divide H and W or (below `size`) that they divide, where it repeats."""
  size: int

  def __call__(self, x):
    b, h, w, c = x.shape
    if h >= self.size:
      return x.reshape(b, self.size, h // self.size, self.size, w // self.size, c).mean((2, 4))
    return jnp.repeat(jnp.repeat(x, self.size // h, axis=1), self.size // w, axis=2)


_UNROLLED = contextvars.ContextVar('alma_jax_unrolled_scans', default=False)


@contextlib.contextmanager
def unrolled_scans():
  """Within it, models trace their scanned layers unrolled (no loop in the program), so that
  XLA's cost analysis, which counts a loop's body once, counts every layer. Only for programs
  traced afresh within it (FLOP counting); the traces of running code are left as they are."""
  token = _UNROLLED.set(True)
  try:
    yield
  finally:
    _UNROLLED.reset(token)


def scan_unroll() -> int | bool:
  """The `unroll` for `nn.scan` over a model's layers: 1 (a loop), or all inside
  `unrolled_scans`."""
  return True if _UNROLLED.get() else 1
