"""Firefly width growth (Wu et al. 2020) as pure functions over one member's Flax variables.

A network is a chain of layers (`neuron_layers()` of the MLP and the VGG: kernel path and
BatchNorm path), each layer's output neurons the next layer's inputs; the last layer (the head)
keeps its outputs. The candidates of a layer are its existing neurons, each split in two (input
weights W + split and W - split, both copies' outgoing weights halved), and brand-new neurons
(input weights `new_in`, outgoing weights `new_out`, bias 0, fresh BatchNorm). `grow` adds the
chosen ones. With zero split perturbations and zero outgoing weights of the new neurons, growth
leaves the network's function unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Layers = list[tuple[tuple[str, ...], tuple[str, ...] | None]]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  """A copy of the nested dict `tree` with `value` at `path` (other branches shared)."""
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _kernels(variables, layers: Layers):
  return [_get(variables['params'], path)['kernel'] for path, _ in layers]


def neurons(variables, layers: Layers) -> int:
  """Output neurons of the growable layers (all but the head)."""
  return sum(k.shape[-1] for k in _kernels(variables, layers)[:-1])


def check_chain(variables, layers: Layers) -> None:
  """Raises ValueError unless each layer reads exactly the previous layer's outputs (a VGG's
  head reads a 1x1 map); `variables` may be abstract."""
  kernels = _kernels(variables, layers)
  for l, (kernel, following) in enumerate(zip(kernels[:-1], kernels[1:])):
    if following.shape[-2] != kernel.shape[-1]:
      raise ValueError(f"config.learner.name='firefly': layer {'/'.join(layers[l + 1][0])} "
                       f"reads {following.shape[-2]} inputs, not the {kernel.shape[-1]} outputs "
                       f"of {'/'.join(layers[l][0])} that Firefly grows (a VGG's halvings must "
                       f"leave a 1x1 map, as 32x32 inputs do for 5 blocks)")


def candidates(key, variables, layers: Layers, new_neurons: int) -> list[dict]:
  """Per growable layer: split perturbations ~ U(-0.1, 0.1) shaped like its kernel, and
  `new_neurons` new neurons' input weights ~ N(0, 0.1^2) and outgoing weights ~ U(-0.01, 0.01)."""
  check_chain(variables, layers)
  kernels = _kernels(variables, layers)
  out = []
  for l, (kernel, following) in enumerate(zip(kernels[:-1], kernels[1:])):
    split_key, in_key, out_key = jax.random.split(jax.random.fold_in(key, l), 3)
    out.append({
        'split': jax.random.uniform(split_key, kernel.shape, minval=-0.1, maxval=0.1),
        'new_in': 0.1 * jax.random.normal(in_key, kernel.shape[:-1] + (new_neurons,)),
        'new_out': jax.random.uniform(out_key, following.shape[:-2] + (new_neurons,
                                                                      following.shape[-1]),
                                      minval=-0.01, maxval=0.01)})
  return out


def _pad_inputs(a, size: int):
  """`a` zero-padded on its input axis (-2) to `size`: perturbations touch original inputs only."""
  pad = [(0, 0)] * a.ndim
  pad[-2] = (0, size - a.shape[-2])
  return jnp.pad(a, pad)


def grow(variables, layers: Layers, cands: list[dict], split, new):
  """`variables` with, in every growable layer l, the neurons `split[l]` split in two and the
  new neurons `new[l]` of `cands[l]` added (index arrays). Pure: `variables` is not modified."""
  params, stats = variables['params'], variables.get('batch_stats')
  for l, cand in enumerate(cands):
    (path, norm), (next_path, _) = layers[l], layers[l + 1]
    s, n = jnp.asarray(split[l], jnp.int32), jnp.asarray(new[l], jnp.int32)
    layer = _get(params, path)
    kernel = layer['kernel']
    v = _pad_inputs(cand['split'], kernel.shape[-2])[..., s]
    new_in = _pad_inputs(cand['new_in'], kernel.shape[-2])[..., n]
    cat = lambda old, fill: jnp.concatenate([old, old[s], jnp.full(len(n), fill, old.dtype)])
    params = _set(params, path, {
        'kernel': jnp.concatenate([kernel.at[..., s].add(v), kernel[..., s] - v, new_in], -1),
        'bias': cat(layer['bias'], 0.0)})
    if norm is not None:
      bn = _get(params, norm)
      params = _set(params, norm, {'scale': cat(bn['scale'], 1.0), 'bias': cat(bn['bias'], 0.0)})
      running = _get(stats, norm)
      stats = _set(stats, norm, {'mean': cat(running['mean'], 0.0),
                                 'var': cat(running['var'], 1.0)})
    following = _get(params, next_path)
    halved = following['kernel'].at[..., s, :].multiply(0.5)
    params = _set(params, next_path, {
        **following,
        'kernel': jnp.concatenate([halved, halved[..., s, :], cand['new_out'][..., n, :]], -2)})
  return {**variables, 'params': params, **({} if stats is None else {'batch_stats': stats})}


def gated(cands: list[dict], split_gates: list, new_gates: list) -> list[dict]:
  """Candidates whose split perturbations and new outgoing weights are scaled per neuron."""
  return [{'split': c['split'] * g, 'new_in': c['new_in'], 'new_out': c['new_out'] * h[:, None]}
          for c, g, h in zip(cands, split_gates, new_gates)]
