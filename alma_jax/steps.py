"""Pure, compiled train and evaluation steps.

A training or evaluation set is a vector of indices into the data set's arrays. Arrays on the
devices (`placement`) are gathered by index inside the compiled loops; arrays on the hosts are
gathered there a few batches ahead and fed to compiled calls of a few steps each, in the same
order and with the same keys. Index vectors are padded to a few bucket sizes (`pad_indices`) so
that a stream whose rounds differ in size compiles a handful of programs, not one per round; `n`
says how many entries are real. A whole epoch of device-resident data runs as one compiled loop
over batches, and the host decides only between epochs (`compiled_epoch=False`: a call a step).

Learners train a stack of members (Flax variables with a leading member axis, one member for a
single model): the epoch is `vmap`ped over members, each with its own indices, example weights and
shuffling, so k members train in one compiled program, split over the mesh's `member` axis.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alma_jax import metrics, placement, sharding

# loss_fn(variables, images, labels, weights, key) -> (sum of the weighted per-example losses,
# updated non-parameter collections)
# for one member's Flax variables ({'params': ..., 'batch_stats': ...}); weights are 0 on padding.
# metric_fn(variables, images, labels, weights) -> dict of sums over the batch.
LossFn = Callable[..., jax.Array]
MetricFn = Callable[..., dict]


tree_add = jax.jit(functools.partial(jax.tree.map, jnp.add))  # one program for a whole tree


def bucket_size(n: int, multiple: int, minimum: int = 1024) -> int:
  """The next power of two >= n (at least `minimum`), rounded up to a multiple of `multiple`."""
  size = max(minimum, 1 << max(n - 1, 0).bit_length())
  return -(-size // multiple) * multiple


def pad_indices(indices: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
  """`indices` (..., n) zero-padded on the last axis to a bucket size; and n."""
  n = indices.shape[-1]
  padded = np.zeros(indices.shape[:-1] + (bucket_size(n, multiple),), np.int32)
  padded[..., :n] = indices
  return padded, n


def blocks(indices: np.ndarray, size: int) -> tuple[np.ndarray, int]:
  """(at least one block of `size` indices, zero-padded; the number of real ones)."""
  n = len(indices)
  padded = np.zeros(max(-(-n // size), 1) * size, np.int32)
  padded[:n] = indices
  return padded.reshape(-1, size), n


def _block(array, start, size):
  return jax.lax.dynamic_slice_in_dim(array, start, size)


def _valid(n, start, size):
  return (start + jnp.arange(size) < n).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Sums `metric_fn` over an index set, one compiled loop over blocks of `batch_size`."""
  metric_fn: MetricFn
  batch_size: int
  mesh: Any
  prefetch: int = 4  # host-resident data: blocks gathered ahead (see placement.prefetched)

  def __post_init__(self):
    replicated = sharding.replicated(self.mesh)
    object.__setattr__(self, 'sums', jax.jit(self._sums, out_shardings=replicated))
    object.__setattr__(self, '_fed_sums', jax.jit(self._block_sums, out_shardings=replicated))

  def _block_sums(self, model, images, labels, n, i):
    """The metric's sums over block `i` (its examples past the `n`th weigh 0)."""
    return self.metric_fn(model, images, labels, _valid(n, i * self.batch_size, self.batch_size))

  def _sums(self, model, images, labels, indices, n):
    def block_sums(i):
      block = _block(indices, i * self.batch_size, self.batch_size)
      block = jax.lax.with_sharding_constraint(block, sharding.batch_sharded(self.mesh))
      return self._block_sums(model, images[block], labels[block], n, i)

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(block_sums, 0))
    num_blocks = (n + self.batch_size - 1) // self.batch_size
    return jax.lax.fori_loop(0, num_blocks, lambda i, t: jax.tree.map(jnp.add, t, block_sums(i)),
                             zeros)

  def __call__(self, model, images, labels, indices: np.ndarray) -> dict:
    """Host sums of the metric over `indices` (a 1-D array of any length)."""
    return jax.device_get(self.device_sums(model, images, labels, indices))

  def device_sums(self, model, images, labels, indices: np.ndarray) -> dict:
    """The sums as (replicated) device arrays: for device-resident data, dispatched and not
    waited for (data on the hosts is gathered and fed block by block before it returns)."""
    with sharding.activations(self.mesh):
      return self._device_sums(model, images, labels, indices)

  def _device_sums(self, model, images, labels, indices: np.ndarray) -> dict:
    if not placement.on_host(images):
      return self.sums(model, images, labels, *pad_indices(indices, self.batch_size))
    fed_blocks, n = blocks(indices, self.batch_size)
    where = sharding.examples_sharded(self.mesh, self.batch_size)
    fed = placement.prefetched(
        lambda i: placement.global_examples(images, labels, fed_blocks[i], where),
        len(fed_blocks), self.prefetch)
    total = None
    for i, (block_images, block_labels) in enumerate(fed):
      sums = self._fed_sums(model, block_images, block_labels, n, i)
      total = sums if total is None else tree_add(total, sums)
    return total


def feed_plan(steps: int, feed_steps: int) -> list[tuple[int, int]]:
  """(first step, steps) of each compiled call of a host-fed epoch: `feed_steps` at a time,
  the rest in decreasing powers of two (a few more programs, none of them per step)."""
  feeds, first = [], 0
  while first < steps:
    count = min(feed_steps, 1 << ((steps - first).bit_length() - 1))
    feeds.append((first, count))
    first += count
  return feeds


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Compiled epochs of a stack of members for one loss and optimizer.

  An epoch visits each member's examples once in a random order, weighting each example's loss
  by its weight; with `resample` (an argument of `train_epoch`), it instead draws as many
  examples with replacement, with probabilities proportional to the weights (bagging's
  bootstrap, boosting by sampling).

  With `compiled_epoch` a whole epoch is one compiled loop. Without it, the host calls one
  compiled step per batch: XLA:CPU runs convolutions inside loops many times slower than outside
  (jax-ml/jax#12868), so convolutional models on CPU train faster that way.
  """
  loss_fn: LossFn
  optimizer: optax.GradientTransformation
  batch_size: int
  mesh: Any
  compiled_epoch: bool = True
  microbatches: int = 1
  # penalty(params, anchor) -> scalar added to every batch's mean loss, `anchor` a tree of
  # arrays that `train_epoch` is given (e.g. the parameters of an earlier round); None: none.
  penalty: Callable | None = None
  shard_params: bool = False  # FSDP: members' parameters and optimizer states split over `data`
  prefetch: int = 4  # host-resident data: feeds gathered ahead (see placement.prefetched)
  feed_steps: int = 8  # host-resident data: steps (batches) fed to one compiled call

  def __post_init__(self):
    members = lambda f, *axes: jax.vmap(f, in_axes=axes, spmd_axis_name=sharding.MEMBER)
    epoch_axes = (0, 0, None, None, 0, 0, None, 0, None, 0)
    # One program per way of drawing an epoch's examples (each compiled on first use).
    object.__setattr__(self, '_epochs', {resample: jax.jit(
        self._stacked(members(functools.partial(self._member_epoch, resample=resample),
                              *epoch_axes)), donate_argnums=(0, 1)) for resample in (False, True)})
    object.__setattr__(self, '_orders', {resample: jax.jit(
        members(functools.partial(self._member_order, resample=resample), 0, 0, None, 0, None),
        out_shardings=sharding.replicated(self.mesh)) for resample in (False, True)})
    # copy(tree): fresh buffers for a whole tree in one program (not a program per leaf).
    object.__setattr__(self, 'copy', jax.jit(lambda tree: jax.tree.map(jnp.copy, tree)))
    object.__setattr__(self, '_step', jax.jit(
        self._stacked(members(self._member_step, *epoch_axes)), donate_argnums=(0, 1)))
    object.__setattr__(self, '_fed_steps', {several: jax.jit(
        self._stacked(members(functools.partial(self._member_batch_steps, several=several),
                              0, 0, 0, 0, 0, None, 0, None, 0)), donate_argnums=(0, 1))
        for several in (False, True)})

  def _stacked(self, update):
    """`update(variables, opt_state, ...)` with its outputs placed as its inputs are (see
    `place`), so that a call on its own outputs finds the program it compiled."""
    def placed(variables, opt_state, *rest):
      out = update(variables, opt_state, *rest)
      return jax.lax.with_sharding_constraint(
          out, sharding.stacked(self.mesh, out, self.shard_params))
    return placed

  def place(self, variables, opt_state, copy: bool = False):
    """A stack of members and its optimizer states split over the mesh's member axis: where
    the compiled epochs take and leave them (a no-op for their own outputs, unless `copy`:
    fresh buffers, for a caller that still holds the ones training will donate)."""
    placed = self.place_members((variables, opt_state))
    return self.copy(placed) if copy else placed

  def place_members(self, stack):
    """A stack of members' variables (or any tree with a leading member axis) where the
    compiled epochs take them (see `place`)."""
    return jax.device_put(stack, sharding.stacked(self.mesh, stack, self.shard_params))

  def train_epoch(self, variables, opt_state, images, labels, indices, weights, n, keys, epoch,
                  resample: bool = False, anchor=None):
    """Epoch `epoch` of every member (leading axis) over its first `n` indices; `anchor`
    (leading member axis) is what `penalty` compares each member's parameters with."""
    variables, opt_state = self.place(variables, opt_state)
    with sharding.activations(self.mesh):
      if placement.on_host(images):
        return self._fed_epoch(variables, opt_state, images, labels, indices, weights, n, keys,
                               epoch, resample, anchor)
      if self.compiled_epoch:
        return self._epochs[resample](variables, opt_state, images, labels, indices, weights, n,
                                      keys, epoch, anchor)
      indices, weights = self._orders[resample](indices, weights, n, keys, epoch)
      for step in range(self.epoch_steps(n)):
        variables, opt_state = self._step(variables, opt_state, images, labels, indices,
                                          weights, step, keys, epoch, anchor)
      return variables, opt_state

  def _fed_epoch(self, variables, opt_state, images, labels, indices, weights, n, keys, epoch,
                 resample, anchor):
    """An epoch over host-resident arrays: the device draws the order, the host gathers the
    batches of `feed_steps` steps of every member at a time (see `feed_plan`), ahead of the
    compiled call that runs them."""
    order, weights = self._orders[resample](indices, weights, n, keys, epoch)
    order, b = sharding.local_copy(order), self.batch_size
    feeds = feed_plan(self.epoch_steps(n), self.feed_steps)
    members = order.shape[0]
    one, several = (sharding.members_batch_sharded(self.mesh, members),
                    sharding.members_batch_sharded(self.mesh, members, steps=True))

    def feed(i):
      first, count = feeds[i]
      rows = order[:, first * b:(first + count) * b]
      rows, where = (rows, one) if count == 1 else (rows.reshape(members, count, b), several)
      return placement.global_examples(images, labels, rows, where)

    for i, (batch_images, batch_labels) in enumerate(
        placement.prefetched(feed, len(feeds), self.prefetch)):
      first, count = feeds[i]
      variables, opt_state = self._fed_steps[count > 1](
          variables, opt_state, batch_images, batch_labels, weights, first, keys, epoch, anchor)
    return variables, opt_state

  def train_step(self, variables, opt_state, images, labels, weights, key, anchor=None):
    """One optimizer update of one member on one (weighted, padded) batch. The optimizer sees
    the parameters; other collections (BatchNorm statistics) come updated from the forward.

    With `microbatches` > 1 the batch's gradient is accumulated over that many equal slices
    run one after another (the same update, less activation memory); each slice updates the
    other collections in turn.
    """
    params = variables['params']
    count = jnp.maximum(jnp.sum(weights > 0), 1.0)  # the mean is over the whole batch's examples

    def gradients(collections, images, labels, weights, key):
      def loss(p):
        total, updated = self.loss_fn({**collections, 'params': p}, images, labels, weights, key)
        mean = total / count
        if self.penalty is not None and self.microbatches == 1:
          mean = mean + self.penalty(p, anchor)
        return mean, updated
      return jax.grad(loss, has_aux=True)(params)

    collections = {k: v for k, v in variables.items() if k != 'params'}
    if self.microbatches == 1:
      grads, updated = gradients(collections, images, labels, weights, key)
    else:
      def accumulate(carry, micro):
        total, collections = carry
        i, *batch = micro
        grads, updated = gradients(collections, *batch, jax.random.fold_in(key, i))
        # A slice of padding alone (the end of an epoch's last batch) adds nothing and keeps
        # the statistics: BatchNorm's over no example are NaN.
        real = jnp.any(batch[-1] > 0)
        grads = jax.tree.map(lambda g: jnp.where(real, g, 0), grads)
        updated = jax.tree.map(lambda new, old: jnp.where(real, new, old), updated,
                               {k: collections[k] for k in updated})
        return (jax.tree.map(jnp.add, total, grads), {**collections, **updated}), None

      split = sharding.microbatch_sharded(self.mesh)
      slices = [jax.lax.with_sharding_constraint(
          a.reshape((self.microbatches, -1) + a.shape[1:]), split)
          for a in (images, labels, weights)]
      (grads, updated), _ = jax.lax.scan(
          accumulate, (jax.tree.map(jnp.zeros_like, params), collections),
          (jnp.arange(self.microbatches), *slices))
      if self.penalty is not None:  # once per batch, whatever its slices hold
        grads = jax.tree.map(jnp.add, grads, jax.grad(self.penalty)(params, anchor))
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return {**variables, **updated, 'params': optax.apply_updates(params, updates)}, opt_state

  @staticmethod
  def _member_order(indices, weights, n, key, epoch, resample: bool):
    """One member's examples in epoch `epoch`'s order, and their loss weights."""
    key = jax.random.fold_in(jax.random.fold_in(key, epoch), 0)
    real = jnp.arange(indices.shape[0]) < n
    if resample:
      order = jax.random.choice(key, indices.shape[0], indices.shape, p=weights / jnp.sum(weights))
      return indices[order], real.astype(jnp.float32)
    order = jnp.argsort(jnp.where(real, jax.random.uniform(key, indices.shape), 2.0))
    return indices[order], weights[order]

  def _member_step(self, variables, opt_state, images, labels, indices, weights, step, key,
                   epoch, anchor):
    """Step `step` of one member's epoch over its ordered `indices`."""
    b = self.batch_size
    block = jax.lax.with_sharding_constraint(_block(indices, step * b, b),
                                             sharding.batch_sharded(self.mesh))
    return self._member_batch_step(variables, opt_state, images[block], labels[block], weights,
                                   step, key, epoch, anchor)

  def _member_batch_step(self, variables, opt_state, images, labels, weights, step, key, epoch,
                         anchor):
    """Step `step` of one member's epoch, on its batch of that step."""
    b = self.batch_size
    return self.train_step(variables, opt_state, images, labels, _block(weights, step * b, b),
                           jax.random.fold_in(jax.random.fold_in(key, epoch), step + 1), anchor)

  def _member_batch_steps(self, variables, opt_state, images, labels, weights, first, key, epoch,
                          anchor, several: bool):
    """Steps first, first + 1, ... of one member's epoch on their batches, stacked on a
    leading axis when `several` (one compiled loop), else the batch of step `first`."""
    if not several:
      return self._member_batch_step(variables, opt_state, images, labels, weights, first, key,
                                     epoch, anchor)
    body = lambda i, carry: self._member_batch_step(*carry, images[i], labels[i], weights,
                                                    first + i, key, epoch, anchor)
    return jax.lax.fori_loop(0, images.shape[0], body, (variables, opt_state))

  def _member_epoch(self, variables, opt_state, images, labels, indices, weights, n, key, epoch,
                    anchor, resample: bool):
    indices, weights = self._member_order(indices, weights, n, key, epoch, resample)
    body = lambda step, carry: self._member_step(*carry, images, labels, indices, weights, step,
                                                 key, epoch, anchor)
    return jax.lax.fori_loop(0, self.epoch_steps(n), body, (variables, opt_state))

  def epoch_steps(self, n):
    """The steps (batches, the last padded) of an epoch over `n` examples."""
    return (n + self.batch_size - 1) // self.batch_size

  def step_flops(self, variables, opt_state, images, labels) -> float | None:
    """FLOPs of one member's compiled train step on a full batch (forward, backward, update;
    not a `penalty`'s few per parameter). Microbatches are counted as the one batch they make
    up: XLA's cost analysis counts a loop's body once, whatever its trip count; the adds that
    accumulate their gradients (parameters x microbatches) are left out."""
    shape = lambda a: jax.ShapeDtypeStruct((self.batch_size,) + a.shape[1:], a.dtype)
    w = jax.ShapeDtypeStruct((self.batch_size,), jnp.float32)
    step = jax.jit(functools.partial(
        dataclasses.replace(self, penalty=None, microbatches=1).train_step, anchor=None))
    return metrics.cost_flops(step, variables, opt_state, shape(images), shape(labels), w,
                              jax.random.key(0))
