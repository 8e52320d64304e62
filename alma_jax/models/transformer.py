"""A decoder-only transformer language model (GPT-2's layout: pre-LayerNorm blocks of causal
self-attention and a 4x MLP, learned positions, optionally tied input and output embeddings).

Parameters are float32; `dtype='bfloat16'` computes in bfloat16 (for accelerators), with the
logits returned in float32. The embedding lookup, the positions and the biases are added in
float32 and then cast, so their gradients, sums over every token of the batch, accumulate in
float32 (in bfloat16 they were up to 30% off). GPT-2 small is width 768, depth 12, 12 heads,
context 1024.

Attention never materializes a mask. `attention='auto'` takes the fastest kernel that runs
(`attention_kernel`): on NVIDIA GPUs, cuDNN's fused (flash) attention through
`jax.nn.dot_product_attention`, or under deterministic GPU kernels (a run's default), where
cuDNN's fails, JAX's Pallas (Triton) flash attention, whose backward pass accumulates without
atomics (bitwise repeatable on an H100); XLA's attention (`'xla'`) where neither takes the
shapes, and on other platforms. `'pallas'` asks for Pallas's. All give the same result to
rounding. Pallas's kernel has no partitioning rule, so on a mesh each device runs it on its own
sequences (`shard_map`).
`remat=True` recomputes each block's activations in the backward pass instead of keeping them
(less memory, about a third more compute). `scan_blocks=True` runs the blocks as one layer
scanned `depth` times, their parameters stacked (`blocks`, leading axis the block): the program
holds one block, compiles in a time that does not grow with depth, and, with sharded parameters
(`mesh.shard_params`), gathers one block's parameters at a time. Its parameter tree differs from
the unscanned model's, so the two don't restore each other's checkpoints.
"""
from __future__ import annotations

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from alma_jax import backend, sharding
from alma_jax.models import layers

_init = nn.initializers.normal(0.02)
ATTENTION = ('auto', 'xla', 'pallas')


def _xla_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')


def _cudnn_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')


# Pallas's tiles: its BlockSizes (rows of queries and keys a program takes in the forward pass,
# in the dK/dV and in the dQ loop of the backward pass) and num_warps (None: Pallas's choice).
# The fastest of experiments/benchmark_attention.py's candidates for GPT-2 small on an H100 in
# run 4 (forward and backward 0.56 ms a block, 0.90 ms with Pallas's defaults: 32-row backward
# tiles), and within 5% of the fastest in run 5 (0.57 ms against 0.54; experiments/results/h100).
PALLAS_TILES = dict(block_q=128, block_k=128, block_q_dkv=64, block_kv_dkv=128, block_q_dq=128,
                    block_kv_dq=64, num_warps=None)


def _pallas_attention(q, k, v, interpret: bool = False, tiles: dict | None = None):
  from jax.experimental.pallas.ops.gpu import attention  # Triton: GPUs (or `interpret`) only
  tiles = dict(PALLAS_TILES if tiles is None else tiles)
  num_warps = tiles.pop('num_warps', None)
  return attention.mha(q, k, v, None, sm_scale=1 / math.sqrt(q.shape[-1]), causal=True,
                       block_sizes=attention.BlockSizes(**tiles), num_warps=num_warps,
                       interpret=interpret)


def _on_each_device(kernel):
  """`kernel` run by each device of the traced program's mesh on its own sequences (the batch
  split over `data`). Pallas's kernel has no partitioning rule: without this, XLA would gather
  every device's queries, keys and values onto each. (`_splits_over_data`: the mesh's member
  axis is 1, so the vmap over members, whose `spmd_axis_name` adds it, divides any stack.)"""

  def run(q, k, v):
    if jax.sharding.get_abstract_mesh().size <= 1:
      return kernel(q, k, v)
    spec = P(sharding.DATA)
    return jax.shard_map(kernel, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)

  return run


def _splits_over_data(batch: int) -> bool:
  """Whether `_on_each_device` takes `batch` sequences a member on the traced program's mesh:
  members not split over devices (a stack of 3 would not split over 2), the batch over data."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.size <= 1 or (set(mesh.axis_names) == {sharding.MEMBER, sharding.DATA}
                            and mesh.shape[sharding.MEMBER] == 1
                            and batch % mesh.shape[sharding.DATA] == 0)


_GPU_KERNELS = {'cudnn': _cudnn_attention, 'pallas': _on_each_device(_pallas_attention)}


def causal_attention(q, k, v, implementation: str = 'auto'):
  """Causal multi-head attention of (B, L, heads, head width) queries, keys and values.

  The kernel is the one `attention_kernel` names. A GPU kernel is chosen when the program is
  lowered for a platform (`lax.platform_dependent`), so the same traced program lowers to XLA's
  attention for the CPU (as FLOP counting does).
  """
  kernel = attention_kernel(implementation, q, k, v)
  if kernel == 'xla':
    return _xla_attention(q, k, v)
  return jax.lax.platform_dependent(q, k, v, cuda=_GPU_KERNELS[kernel], default=_xla_attention)


def attention_kernel(implementation: str, q, k, v) -> str:
  """'cudnn', 'pallas' or 'xla': the kernel `causal_attention(q, k, v, implementation)` runs on
  this process's default backend (q, k, v: arrays or their shapes). On a GPU, 'pallas' is
  Pallas's where it takes the shapes (a sequence length that is a multiple of its 128-long
  blocks, or a power of 2 from 16 to 64), with a warning where it does not. 'auto', for bfloat16
  or float16 inputs: cuDNN's where the run has no deterministic kernels and cuDNN takes the
  inputs (head width a multiple of 8, at most 128 or 256). Under `--xla_gpu_deterministic_ops`
  cuDNN's attention fails when the first step runs (`IndexError: absl::container_internal::
  raw_hash_map<>::at`, GPT-2 small on an H100, jax 0.11.2); there 'auto' is Pallas's where it
  takes the shapes, else XLA's. On a mesh, Pallas's runs on each device's own sequences
  (`_on_each_device`): the batch must split over the data axis, and members must not be split
  over devices."""
  if implementation == 'xla' or jax.default_backend() != 'gpu':
    return 'xla'
  asked = implementation
  if implementation == 'auto':
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      return 'xla'
    if not backend.deterministic_gpu_kernels():
      implementation = 'cudnn'
    else:
      implementation = 'pallas'
  try:
    batch, length = q.shape[:2]
    if implementation == 'pallas' and length % 128 and not (16 <= length < 128
                                                            and length & (length - 1) == 0):
      raise ValueError(f'sequence length {length}: Pallas blocks are powers of 2')
    if implementation == 'pallas' and not _splits_over_data(batch):
      raise ValueError(f"a batch of {batch} a member does not split over the mesh's data "
                       f"axis, or the members are split over devices")
    jax.eval_shape(_GPU_KERNELS[implementation], q, k, v)
  except (ImportError, NotImplementedError, RuntimeError, ValueError) as why:  # no kernel
    if asked == 'pallas':
      warnings.warn(f"attention='pallas' takes XLA's attention for {q.shape}: {why}")
    return 'xla'
  return implementation


def _gather_lookup(table, tokens):
  return jnp.take(table, tokens, axis=0)


def _one_hot_lookup(table, tokens):
  one_hot = jax.nn.one_hot(tokens, table.shape[0], dtype=table.dtype)
  return jnp.dot(one_hot, table, precision=jax.lax.Precision.HIGHEST)


# The largest vocabulary looked up by a one-hot matmul under deterministic GPU kernels: for
# GPT-2 small's 16 x 1024 tokens, about 0.05 TFLOP each way in float32 at 2048.
ONE_HOT_VOCABULARY = 2048


def embedding_lookup(table, tokens):
  """`table[tokens]`. The lookup's gradient is a scatter-add into the table, which XLA's
  deterministic GPU kernels make deterministic by sorting the tokens (with the loss's, about
  9 ms of GPT-2 small's 40 ms step on an H100 in 0.9.2). So under them, a GPU program looks up a
  vocabulary of at most ONE_HOT_VOCABULARY by a one-hot matmul (exact; its gradient a matmul,
  2 x tokens x vocabulary x width FLOPs each way, which grow with the vocabulary as the sort
  does not); lowered for any other platform it is a gather."""
  if (jax.default_backend() != 'gpu' or not backend.deterministic_gpu_kernels()
      or table.shape[0] > ONE_HOT_VOCABULARY):
    return _gather_lookup(table, tokens)
  return jax.lax.platform_dependent(table, tokens, cuda=_one_hot_lookup, default=_gather_lookup)


class Dense(nn.Module):
  """flax's DenseGeneral over the trailing `axis` of its input (the same 'kernel' and 'bias',
  initialized to the same values), computing in `dtype` but adding the bias in float32: the
  bias's gradient, a sum over every token of the batch, then accumulates in float32 (in
  bfloat16 it came out up to 27% off for a batch of 16 x 1024 tokens)."""
  features: tuple[int, ...]
  dtype: jnp.dtype
  axis: tuple[int, ...] = (-1,)
  float32_out: bool = False  # the product's float32 accumulation itself, not rounded to dtype

  @nn.compact
  def __call__(self, x):
    axis = tuple(a % x.ndim for a in self.axis)
    fan_in = tuple(x.shape[a] for a in axis)
    kernel = self.param(
        'kernel', lambda key, shape: _init(key, (math.prod(fan_in), math.prod(self.features)))
        .reshape(shape), fan_in + self.features)
    bias = self.param('bias', nn.initializers.zeros, self.features)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((axis, tuple(range(len(axis)))), ((), ())),
                            preferred_element_type=jnp.float32 if self.float32_out else None)
    y = y.astype(jnp.float32) + bias
    return y if self.float32_out else y.astype(self.dtype)


class CausalSelfAttention(nn.Module):
  """Query, key, value and output projections named and shaped as flax's
  MultiHeadDotProductAttention (which earlier versions used), so their checkpoints restore."""
  heads: int
  dtype: jnp.dtype
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f'config.model.width={width}: must be a multiple of model.heads='
                       f'{self.heads}')
    project = lambda name: Dense((self.heads, width // self.heads), self.dtype, name=name)
    y = causal_attention(project('query')(x), project('key')(x), project('value')(x),
                         self.implementation)
    return Dense((width,), self.dtype, axis=(-2, -1), name='out')(y)


class Block(nn.Module):
  heads: int
  dtype: jnp.dtype
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.with_logical_constraint(x, (sharding.BATCH, None, None))
    h = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + CausalSelfAttention(self.heads, self.dtype, self.attention,
                                name='MultiHeadDotProductAttention_0')(h)
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.gelu(Dense((4 * width,), self.dtype, name='Dense_0')(h))
    return x + Dense((width,), self.dtype, name='Dense_1')(h)


class ScannedBlock(Block):
  """A block as the body of `nn.scan`: (carry, nothing) -> (carry, nothing)."""

  def __call__(self, x, _):
    return super().__call__(x), None


class Transformer(nn.Module):
  num_classes: int = 256  # the vocabulary
  context: int = 128
  width: int = 128
  depth: int = 4
  heads: int = 4
  tied_embeddings: bool = True
  dtype: str = 'float32'
  attention: str = 'auto'  # 'auto', 'xla' or 'pallas': see causal_attention
  remat: bool = False      # recompute block activations in the backward pass
  scan_blocks: bool = False  # the blocks as one scanned layer (parameters stacked)

  @classmethod
  def check_config(cls, keys: dict) -> None:
    """Raises ValueError naming the first of the model's `keys` it cannot be built with."""
    if keys['width'] % keys['heads']:
      raise ValueError(f'config.model.width={keys["width"]}: must be a multiple of '
                       f'model.heads={keys["heads"]}')
    try:
      floating = jnp.issubdtype(jnp.dtype(keys['dtype']), jnp.floating)
    except TypeError:
      floating = False
    if not floating:
      raise ValueError(f'config.model.dtype={keys["dtype"]!r}: must name a floating-point type '
                       f'(float32, bfloat16, float16)')
    if keys['attention'] not in ATTENTION:
      raise ValueError(f'config.model.attention={keys["attention"]!r}: must be \'auto\' (on GPUs '
                       f'cuDNN\'s, or Pallas\'s under deterministic kernels, where they take '
                       f'the shapes), \'xla\' or \'pallas\' (Pallas\'s flash attention on GPUs)')

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    """Next-token logits (B, L, vocabulary) of int tokens (B, L), L <= context."""
    del train  # no dropout
    dtype = jnp.dtype(self.dtype)
    embed = nn.Embed(self.num_classes, self.width, embedding_init=_init, dtype=dtype)
    positions = self.param('positions', _init, (self.context, self.width))
    # Looked up and summed in float32, then cast: the gradient of the lookup (a scatter-add
    # into the table) and of the positions (a sum over the batch) accumulate in float32. In
    # bfloat16 the most frequent byte's gradient row summed thousands of rounded terms (up to
    # 29% off).
    x = (embedding_lookup(embed.embedding, tokens) + positions[:tokens.shape[1]]).astype(dtype)
    x = nn.with_logical_constraint(x, (sharding.BATCH, None, None))
    if self.scan_blocks:
      block = nn.remat(ScannedBlock, prevent_cse=False) if self.remat else ScannedBlock
      blocks = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                       length=self.depth, unroll=layers.scan_unroll())
      x, _ = blocks(self.heads, dtype, self.attention, name='blocks')(x, None)
    else:
      block = nn.remat(Block) if self.remat else Block
      for i in range(self.depth):
        x = block(self.heads, dtype, self.attention, name=f'Block_{i}')(x)
    x = nn.LayerNorm(dtype=dtype)(x)
    # Logits in float32 from the product's accumulation: rounded to bfloat16 first, a token's
    # cross-entropy moved by about 0.01 nats.
    if self.tied_embeddings:
      return jnp.einsum('bld,vd->blv', x, embed.embedding.astype(dtype),
                        preferred_element_type=jnp.float32)
    return Dense((self.num_classes,), dtype, float32_out=True, name='Dense_0')(x)
