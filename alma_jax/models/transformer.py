"""A decoder-only transformer language model (GPT-2's layout: pre-LayerNorm blocks of causal
self-attention and a 4x MLP, learned positions, optionally tied input and output embeddings).

Parameters are float32; `dtype='bfloat16'` computes in bfloat16 (for accelerators), with the
logits returned in float32. GPT-2 small is width 768, depth 12, 12 heads, context 1024.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

_init = nn.initializers.normal(0.02)


class Block(nn.Module):
  heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    width = x.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, kernel_init=_init)(
        h, h, mask=mask)
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.gelu(nn.Dense(4 * width, dtype=self.dtype, kernel_init=_init)(h))
    return x + nn.Dense(width, dtype=self.dtype, kernel_init=_init)(h)


class Transformer(nn.Module):
  num_classes: int = 256  # the vocabulary
  context: int = 128
  width: int = 128
  depth: int = 4
  heads: int = 4
  tied_embeddings: bool = True
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    """Next-token logits (B, L, vocabulary) of int tokens (B, L), L <= context."""
    del train  # no dropout
    dtype = jnp.dtype(self.dtype)
    embed = nn.Embed(self.num_classes, self.width, embedding_init=_init, dtype=dtype)
    positions = self.param('positions', _init, (self.context, self.width))
    x = embed(tokens) + positions[:tokens.shape[1]].astype(dtype)
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.depth):
      x = Block(self.heads, dtype)(x, mask)
    x = nn.LayerNorm(dtype=dtype)(x)
    if self.tied_embeddings:
      return embed.attend(x).astype(jnp.float32)
    return nn.Dense(self.num_classes, dtype=dtype, kernel_init=_init)(x).astype(jnp.float32)
