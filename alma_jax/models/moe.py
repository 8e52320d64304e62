"""Mixtures of experts whose tree of experts is read from their parameters, so they can grow.

A `Mixture` is: an optional shared stem, then mixture layers, then a linear head. A node of a
mixture layer holds a dense softmax gate over its children, `sum_k g_k(x) child_k(x)`; a child
is a leaf expert (a Flax module) or another node. gMoE grows a layer by replacing one leaf with
a node of two copies of it and a fresh gate, which leaves the function unchanged (the gate's
weights sum to one).

MoE-MLP: every hidden layer a mixture of Dense + ReLU experts; the gate sees the layer's input.
MoE-VGG: VGG block 0 is the shared stem, every later block a mixture of copies of the block
(BatchNorm included), identical at initialization as the reference's `deepcopy`
(crlapi/sl/architectures/vgg.py:125); the gate sees the block's input average-pooled to 4x4.
(The reference's MoE-MLP initializes its experts independently: architectures/mlp.py:70.)

Variables: params {'stem': ..., 'layer_0': node, ..., 'head': dense}, node = {'gate': dense,
'children': {'0': child, ...}}, a leaf = its expert's params; BatchNorm statistics, when the
experts have them, in 'batch_stats' under the same paths (nodes without 'gate').
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from alma_jax.models.layers import AdaptiveAvgPool, Linear, torch_linear_params as _dense_init
from alma_jax.models.mlp import MLP
from alma_jax.models.vgg import VGG, ConvBlock, check_image_size


def _dense(params, x):
  return x @ params['kernel'] + params['bias']


def is_leaf(node) -> bool:
  return 'children' not in node


class ReLULinear(Linear):
  """Dense + ReLU: the expert of an MoE-MLP (its params are a dense layer's)."""

  def __call__(self, x, train: bool = False, mask=None):
    del train, mask
    return nn.relu(super().__call__(x))


def flat(x):
  return x.reshape((x.shape[0], -1))


def pooled_4x4(x):
  """The gate's view of a VGG block's input: average-pooled to 4x4, flattened (the reference's
  AdaptiveAvgPool2d(4) + Flatten, crlapi/sl/architectures/vgg.py:121-124)."""
  return flat(AdaptiveAvgPool(4)(x))


@dataclasses.dataclass(frozen=True)
class Mixture:
  """stem -> mixture layers of `experts[i]` (each with `num_experts` leaves at the start) -> head."""
  experts: tuple[nn.Module, ...]
  num_experts: int = 2
  num_classes: int = 10
  stem: nn.Module | None = None
  gate_view: Callable = flat
  identical_experts: bool = False  # a layer's experts start as copies of one

  def _stages(self):
    return [f'layer_{i}' for i in range(len(self.experts))]

  def init(self, key, x):
    params, stats = {}, {}
    if self.stem is not None:  # a VGG's first block: the experts are the others
      check_image_size(x, 1 + len(self.experts))
      key, stem_key = jax.random.split(key)
      params['stem'], stats['stem'], x = self._init_module(self.stem, stem_key, x)
    else:
      x = flat(x)
    for name, expert in zip(self._stages(), self.experts):
      key, gate_key, *expert_keys = jax.random.split(key, self.num_experts + 2)
      if self.identical_experts:
        expert_keys = [expert_keys[0]] * self.num_experts
      children, child_stats = {}, {}
      for e, k in enumerate(expert_keys):
        children[str(e)], child_stats[str(e)], out = self._init_module(expert, k, x)
      params[name] = {'gate': _dense_init(gate_key, self.gate_view(x).shape[-1],
                                          self.num_experts),
                      'children': children}
      stats[name] = {'children': child_stats}
      x = out
    params['head'] = _dense_init(key, math.prod(x.shape[1:]), self.num_classes)
    variables = {'params': params}
    if jax.tree.leaves(stats):
      variables['batch_stats'] = stats
    return variables

  @staticmethod
  def _init_module(module, key, x):
    variables = module.init(key, x)
    out = jax.eval_shape(module.apply, variables, x)
    return variables['params'], variables.get('batch_stats', {}), jnp.zeros(out.shape, out.dtype)

  def apply(self, variables, x, train: bool = False, mask=None, mutable=(),
            with_usage: bool = False):
    """Logits; with `mutable` (training with BatchNorm) also the updated statistics; with
    `with_usage`, also {layer/path: (B,) usage} of every leaf expert (the product of the gate
    probabilities on its path)."""
    params = variables['params']
    stats = variables.get('batch_stats', {})
    updated, usage = {}, {}

    def run(module, p, s, x):
      module_vars = {'params': p, **({'batch_stats': s} if s else {})}
      if s and mutable:
        y, new = module.apply(module_vars, x, train=train, mask=mask, mutable=['batch_stats'])
        return y, new['batch_stats']
      return module.apply(module_vars, x, train=train, mask=mask), s

    def node(expert, p, s, x, path, gate_prob):
      if is_leaf(p):
        usage[path] = gate_prob
        return run(expert, p, s, x)
      gates = jax.nn.softmax(_dense(p['gate'], self.gate_view(x)))
      out, children = 0.0, {}
      for k in sorted(p['children'], key=int):
        y, children[k] = node(expert, p['children'][k], s['children'][k] if s else {}, x,
                              f'{path}/{k}', gate_prob * gates[:, int(k)])
        out = out + gates[:, int(k)].reshape((-1,) + (1,) * (y.ndim - 1)) * y
      return out, {'children': children}

    if self.stem is not None:
      x, updated['stem'] = run(self.stem, params['stem'], stats.get('stem', {}), x)
    else:
      x = flat(x)
    for name, expert in zip(self._stages(), self.experts):
      x, updated[name] = node(expert, params[name], stats.get(name, {}), x, name,
                              jnp.ones(x.shape[:1]))
    logits = _dense(params['head'], flat(x))
    out = (logits, usage) if with_usage else logits
    return (out, {'batch_stats': updated}) if stats and mutable else out


def mixture_of(module, num_experts: int) -> Mixture:
  """`module` (an MLP or a VGG) with mixture layers of `num_experts` experts."""
  if isinstance(module, MLP):
    return Mixture(experts=(ReLULinear(module.hidden),) * module.num_layers,
                   num_experts=num_experts, num_classes=module.num_classes)
  if isinstance(module, VGG):
    return Mixture(experts=tuple(ConvBlock(module.width, convs) for convs in module.blocks[1:]),
                   num_experts=num_experts, num_classes=module.num_classes,
                   stem=ConvBlock(module.width, module.blocks[0]), gate_view=pooled_4x4,
                   identical_experts=True)
  raise ValueError(f'no mixture-of-experts version of model {type(module).__name__}')


def _get(tree, path: str):
  layer, *steps = path.split('/')
  node = tree[layer]
  for k in steps:
    node = node['children'][k]
  return node


def _replace(tree, path: str, node):
  """A copy of `tree` (its containers; arrays shared) with `node` at `path`."""
  layer, *steps = path.split('/')
  grown = jax.tree.map(lambda a: a, tree)
  if not steps:
    grown[layer] = node
    return grown
  _get(grown, '/'.join([layer] + steps[:-1]))['children'][steps[-1]] = node
  return grown


def split_leaf(variables, path: str, gate_key):
  """`variables` with the leaf at `path` replaced by a node of two copies and a fresh gate."""
  params = variables['params']
  fan_in = params[path.split('/')[0]]['gate']['kernel'].shape[0]
  leaf = _get(params, path)
  grown = {**variables, 'params': _replace(params, path, {
      'gate': _dense_init(gate_key, fan_in, 2), 'children': {'0': leaf, '1': leaf}})}
  if 'batch_stats' in variables:
    leaf_stats = _get(variables['batch_stats'], path)
    grown['batch_stats'] = _replace(variables['batch_stats'], path,
                                    {'children': {'0': leaf_stats, '1': leaf_stats}})
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
