"""Causal attention's forward and backward pass by kernel, and Pallas's tiles, at GPT-2 small's
shape; then the config's train step with the fastest Pallas tiles.

    python experiments/benchmark_attention.py [--config=configs/lm.py:gpt2_small] [--calls=50]
                                              [--steps=60] [--out=...]

With deterministic GPU kernels (a run's default, config.backend), cuDNN's attention fails on a
GPU (see transformer.attention_kernel), and XLA's materializes the scores; Pallas's flash
attention runs, and its speed is its tiles' (transformer.PALLAS_TILES). For each kernel (XLA's;
on GPUs Pallas's with each candidate tiling, and cuDNN's where the kernels are not deterministic)
this times jitted gradients of (batch, context, heads, head width) attention, with nothing
compiled in the timed calls, and says whether two calls give bitwise-equal gradients. Then
(unless --steps=0) it times `--steps` train steps of the config (benchmark_lm.throughput) with
attention='pallas' and the fastest tiles. On a CPU: XLA's kernel only, and Pallas's
interpreter at a small shape (`--cpu_check`, a check of this script). Writes experiments/results/lm/attention_<backend>.json.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from alma_jax import backend, config as alma_config, data
from alma_jax.models import transformer
import benchmark_lm

# Pallas tilings to try: its defaults (BlockSizes.get_default()) first, then larger backward
# tiles (its dK/dV rows of keys must equal its dQ rows of queries). On the H100, 8 warps and
# 32 x 64 backward tiles were slower (experiments/results/h100/run4_attention_gpu.json).
_DEFAULT = dict(block_q=128, block_k=128, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32,
                block_kv_dq=32, num_warps=None)
_CHOSEN = transformer.PALLAS_TILES
CANDIDATES = [
    _DEFAULT,
    {**_DEFAULT, 'block_q_dkv': 64, 'block_kv_dkv': 64, 'block_q_dq': 64, 'block_kv_dq': 64},
    _CHOSEN,
    {**_DEFAULT, 'block_q_dkv': 32, 'block_kv_dkv': 128, 'block_q_dq': 128, 'block_kv_dq': 32},
    {**_DEFAULT, 'block_q_dkv': 128, 'block_kv_dkv': 128, 'block_q_dq': 128, 'block_kv_dq': 128},
    {**_CHOSEN, 'block_k': 64},
]


def time_kernel(attention, shape, dtype, calls: int) -> dict:
  """Milliseconds a call of jitted gradients of sum(attention(q, k, v) * w) takes, and whether
  two calls give bitwise-equal gradients."""
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(key, shape, dtype) for key in keys)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * w),
                           argnums=(0, 1, 2)))
  first = jax.block_until_ready(grads(q, k, v))
  with backend.no_compilation('the timed attention calls'):
    began = time.perf_counter()
    for _ in range(calls):
      out = grads(q, k, v)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - began
  repeatable = all(np.array_equal(a, b) for a, b in zip(first, out))
  return {'ms': 1000 * seconds / calls, 'bitwise_repeatable': repeatable}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/lm.py:gpt2_small')
  parser.add_argument('--calls', type=int, default=0, help='timed calls (0: 50 on GPUs, 2 on CPUs)')
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--cpu_check', action='store_true',
                      help='on a CPU: Pallas interpreted at a small shape, one train step')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  config = alma_config.load(args.config)
  backend.configure(config.backend)  # as a run of the config would, before the backend starts
  gpu = jax.default_backend() == 'gpu'
  args.calls = args.calls or (50 if gpu else 2)
  m = config.model
  shape = (config.train.batch_size, config.data.sequence_length, m.heads, m.width // m.heads)
  dtype = jnp.dtype(m.dtype)
  pallas = functools.partial(transformer._pallas_attention, interpret=not gpu)
  if not gpu and args.cpu_check:
    shape, dtype = (1, 128, 2, 64), jnp.dtype('float32')
    config.train.batch_size, config.model.dtype = 1, 'float32'
    args.calls, args.steps = 1, 1
  result = {**common.environment(), 'config': args.config, 'shape': list(shape),
            'dtype': dtype.name, 'deterministic_gpu_kernels': backend.deterministic_gpu_kernels(),
            'kernels': {}}
  out = args.out or os.path.join('experiments', 'results', 'lm',
                                 f'attention_{jax.default_backend()}.json')
  kernels = {'xla': transformer._xla_attention}
  if gpu and not backend.deterministic_gpu_kernels():
    kernels['cudnn'] = transformer._cudnn_attention
  if gpu or args.cpu_check:
    kernels.update({f'pallas_{i}': functools.partial(pallas, tiles=tiles)
                    for i, tiles in enumerate(CANDIDATES[:None if gpu else 2])})
  for name, attention in kernels.items():
    print(f'== {name}', flush=True)
    try:
      result['kernels'][name] = time_kernel(attention, shape, dtype, args.calls)
    except Exception as error:  # a tiling Triton cannot compile is reported, the rest still run
      result['kernels'][name] = common.error(error)
    if name.startswith('pallas'):
      result['kernels'][name]['tiles'] = CANDIDATES[int(name.split('_')[1])]
    print(result['kernels'][name], flush=True)
    common.write_result(result, out, show=False)  # what a time limit cuts is lost alone
  timed = {n: r['ms'] for n, r in result['kernels'].items() if n.startswith('pallas') and 'ms' in r}
  if timed and args.steps:
    fastest = min(timed, key=timed.get)
    result['fastest_pallas'] = fastest
    transformer.PALLAS_TILES = result['kernels'][fastest]['tiles']
    config.model.attention = 'pallas'
    peak = benchmark_lm.matmul_peak()['flops']
    try:
      result['lm_step_with_fastest_pallas'] = benchmark_lm.throughput(
          config, data.load(config.data), args.steps, peak)
    except Exception as error:
      result['lm_step_with_fastest_pallas'] = common.error(error)
  common.write_result(result, out)


if __name__ == '__main__':
  main()
