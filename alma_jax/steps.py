"""Pure, compiled train and evaluation steps over device-resident data.

A training or evaluation set is a vector of indices into the data set's arrays, which live on the
device for the whole run. Index vectors are padded to a few bucket sizes (`pad_indices`) so that a
stream whose rounds differ in size compiles a handful of programs, not one per round; `n` says how
many entries are real. A whole epoch runs as one compiled loop over batches; the host decides only
between epochs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alma_jax import sharding

# loss_fn(params, images, labels, weights, key) -> scalar: weights are 0 for padding examples.
LossFn = Callable[..., jax.Array]
# metric_fn(params, images, labels, weights) -> dict of per-set sums (e.g. {'correct': ...}).
MetricFn = Callable[..., dict]


def pad_indices(indices: np.ndarray, multiple: int, minimum: int = 1024) -> tuple[np.ndarray, int]:
  """Pads `indices` to the next power of two (at least `minimum`, a multiple of `multiple`)."""
  n = len(indices)
  size = max(minimum, 1 << max(n - 1, 0).bit_length())
  size = -(-size // multiple) * multiple
  padded = np.zeros(size, np.int32)
  padded[:n] = indices
  return padded, n


def masked_batch(indices, n, start, batch_size):
  """The index block [start, start + batch_size) and its 0/1 weights (0 past `n`)."""
  block = jax.lax.dynamic_slice_in_dim(indices, start, batch_size)
  weights = (start + jnp.arange(batch_size) < n).astype(jnp.float32)
  return block, weights


def shuffle_first(indices, n, key):
  """A random permutation of the first `n` entries of `indices`, padding kept at the end."""
  keys = jnp.where(jnp.arange(indices.shape[0]) < n,
                   jax.random.uniform(key, indices.shape), 2.0)
  return indices[jnp.argsort(keys)]


def cost_flops(compiled) -> float | None:
  """FLOPs of a compiled computation from XLA's cost analysis (None where the backend has none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Compiled epoch and evaluation functions for one loss, metric and optimizer."""
  loss_fn: LossFn
  metric_fn: MetricFn
  optimizer: optax.GradientTransformation
  batch_size: int
  eval_batch_size: int
  mesh: Any

  def __post_init__(self):
    object.__setattr__(self, 'train_epoch', jax.jit(self._train_epoch, donate_argnums=(0, 1)))
    object.__setattr__(self, 'evaluate', jax.jit(self._evaluate))

  def _gather(self, images, labels, block):
    block = jax.lax.with_sharding_constraint(block, sharding.batch_sharded(self.mesh))
    return images[block], labels[block]

  def train_step(self, params, opt_state, images, labels, weights, key):
    """One optimizer update on one (masked) batch."""
    grads = jax.grad(self.loss_fn)(params, images, labels, weights, key)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def _train_epoch(self, params, opt_state, images, labels, indices, n, key):
    order = shuffle_first(indices, n, jax.random.fold_in(key, 0))
    num_steps = (n + self.batch_size - 1) // self.batch_size

    def body(step, carry):
      params, opt_state = carry
      block, weights = masked_batch(order, n, step * self.batch_size, self.batch_size)
      x, y = self._gather(images, labels, block)
      return self.train_step(params, opt_state, x, y, weights, jax.random.fold_in(key, step + 1))

    return jax.lax.fori_loop(0, num_steps, body, (params, opt_state))

  def _evaluate(self, params, images, labels, indices, n):
    num_blocks = (n + self.eval_batch_size - 1) // self.eval_batch_size
    block0, w0 = masked_batch(indices, n, 0, self.eval_batch_size)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        self.metric_fn, params, *self._gather(images, labels, block0), w0))

    def body(i, totals):
      block, weights = masked_batch(indices, n, i * self.eval_batch_size, self.eval_batch_size)
      sums = self.metric_fn(params, *self._gather(images, labels, block), weights)
      return jax.tree.map(jnp.add, totals, sums)

    return jax.lax.fori_loop(0, num_blocks, body, zeros)

  def step_flops(self, params, opt_state, images, labels) -> float | None:
    """FLOPs of one compiled train step on a full batch (forward + backward + update)."""
    x = jax.ShapeDtypeStruct((self.batch_size,) + images.shape[1:], images.dtype)
    y = jax.ShapeDtypeStruct((self.batch_size,) + labels.shape[1:], labels.dtype)
    w = jax.ShapeDtypeStruct((self.batch_size,), jnp.float32)
    key = jax.random.key(0)
    return cost_flops(jax.jit(self.train_step).lower(params, opt_state, x, y, w, key).compile())
