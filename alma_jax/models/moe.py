"""Mixture-of-experts MLP whose tree of experts is read from its parameters, so it can grow.

Every hidden layer is a mixture layer: a node holds a dense softmax gate over its children,
`sum_k g_k(x) child_k(x)`, and a child is either a leaf expert (Dense + ReLU) or another node.
gMoE grows a layer by replacing one leaf with a node of two copies of it and a fresh gate, which
leaves the network's function unchanged (the gate's weights sum to one).

Parameters: {'layer_0': node, ..., 'head': dense}; node = {'gate': dense, 'children': {'0': ...}};
a leaf is a dense layer ({'kernel', 'bias'}).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from alma_jax.models.layers import torch_linear_params as _dense_init


def _dense(params, x):
  return x @ params['kernel'] + params['bias']


def is_leaf(node) -> bool:
  return 'kernel' in node


def _node_apply(node, x, path: str, usage: dict, gate_prob):
  """Output of a (sub)tree; records each leaf's gate-probability product in `usage`."""
  if is_leaf(node):
    usage[path] = gate_prob
    return nn.relu(_dense(node, x))
  gates = jax.nn.softmax(_dense(node['gate'], x))
  out = 0.0
  for k, child in sorted(node['children'].items(), key=lambda kv: int(kv[0])):
    out = out + gates[:, int(k), None] * _node_apply(child, x, f'{path}/{k}', usage,
                                                     gate_prob * gates[:, int(k)])
  return out


@dataclasses.dataclass(frozen=True)
class MoEMLP:
  """input -> (mixture layer of `num_experts` Dense(h) + ReLU experts) x n -> classes."""
  hidden: int = 64
  num_layers: int = 2
  num_experts: int = 2
  num_classes: int = 10

  def init(self, key, x):
    fan_in = math.prod(x.shape[1:])
    params = {}
    for layer in range(self.num_layers):
      key, gate_key, *expert_keys = jax.random.split(key, self.num_experts + 2)
      params[f'layer_{layer}'] = {
          'gate': _dense_init(gate_key, fan_in, self.num_experts),
          'children': {str(e): _dense_init(k, fan_in, self.hidden)
                       for e, k in enumerate(expert_keys)}}
      fan_in = self.hidden
    params['head'] = _dense_init(key, fan_in, self.num_classes)
    return {'params': params}

  def apply(self, variables, x, train: bool = False, with_usage: bool = False):
    """Logits; with `with_usage`, also {layer/path: (B,) leaf usage} for every leaf expert."""
    del train
    params = variables['params']
    x = x.reshape((x.shape[0], -1))
    usage = {}
    for layer in range(self.num_layers):
      x = _node_apply(params[f'layer_{layer}'], x, f'layer_{layer}', usage,
                      jnp.ones(x.shape[:1]))
    logits = _dense(params['head'], x)
    return (logits, usage) if with_usage else logits


def _get(tree, path: str):
  layer, *steps = path.split('/')
  node = tree[layer]
  for k in steps:
    node = node['children'][k]
  return node


def split_leaf(params, path: str, gate_key):
  """`params` with the leaf at `path` replaced by a node of two copies and a fresh gate."""
  leaf = _get(params, path)
  fan_in = leaf['kernel'].shape[0]
  node = {'gate': _dense_init(gate_key, fan_in, 2), 'children': {'0': leaf, '1': leaf}}
  layer, *steps = path.split('/')
  grown = jax.tree.map(lambda a: a, params)  # a fresh container tree sharing the arrays
  if not steps:
    grown[layer] = node
    return grown
  parent = _get(grown, '/'.join([layer] + steps[:-1]))
  parent['children'][steps[-1]] = node
  return grown


def leaf_paths(params) -> dict[str, list[str]]:
  """{layer: [paths of its leaf experts]}."""
  out = {}

  def walk(node, path, layer):
    if is_leaf(node):
      out.setdefault(layer, []).append(path)
    else:
      for k in sorted(node['children'], key=int):
        walk(node['children'][k], f'{path}/{k}', layer)

  for layer in sorted(k for k in params if k.startswith('layer_')):
    walk(params[layer], layer, layer)
  return out
