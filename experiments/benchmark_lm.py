"""Training throughput of a language model config, and its model FLOP utilization (MFU).

    python experiments/benchmark_lm.py [--config=configs/lm.py] [--steps=400] [--nondeterministic]
                                       [--profile=DIR]

Times compiled epochs of the config's train step (after a first epoch that compiles, with
nothing compiled in the timed one) on the config's data, and this machine's matmul peak (the
best of jitted square matmuls: bfloat16 on accelerators, float32 on CPUs). MFU = achieved model
FLOP/s / peak, with model FLOPs per token counted two ways: XLA's cost analysis of the train step
(forward, backward, AdamW update), and PaLM's 6 N + 12 layers x width x context (N: parameters
without the embeddings). `--profile=DIR`: then a `jax.profiler` trace of 3 steps there (what
profile_summary.py reads). Writes experiments/results/lm/benchmark.json.
"""
from __future__ import annotations

import json
import os
import time

import common
import jax
import jax.numpy as jnp

from alma_jax import backend, learners, placement, sharding
from alma_jax.models import transformer


def matmul_peak(seconds: float = 2.0) -> dict:
  """The best FLOP/s of a jitted (n, n) @ (n, n) here: bfloat16 on accelerators (n up to
  16384), float32 on CPUs (n up to 2048). Calls are queued back to back and waited for once
  per batch of calls (on the last one: a device runs them in order), so the host's dispatch and
  synchronization do not count."""
  cpu = jax.default_backend() == 'cpu'
  dtype, sizes = (jnp.float32, (512, 1024, 2048)) if cpu else (jnp.bfloat16, (4096, 8192, 16384))
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    calls = 1
    with backend.no_compilation(f'{n}x{n} matmul'):
      while True:  # double the batch of calls until it takes a tenth of `seconds`
        elapsed = _seconds(f, a, b, calls)
        best = max(best, 2 * n ** 3 * calls / elapsed)
        if elapsed > seconds / 10:
          break
        calls *= 2
      for _ in range(4):
        best = max(best, 2 * n ** 3 * calls / _seconds(f, a, b, calls))
  return {'flops': best, 'dtype': jnp.dtype(dtype).name, 'sizes': list(sizes)}


def _seconds(f, a, b, calls: int) -> float:
  began = time.perf_counter()
  for _ in range(calls):
    result = f(a, b)
  result.block_until_ready()
  return time.perf_counter() - began


def throughput(config, dataset, num_steps: int, peak: float, profile: str = '',
               profile_steps: int = 3) -> dict:
  """Tokens/s of `num_steps` train steps in one compiled epoch of the config's learner; with
  `profile`, then a trace of an epoch of `profile_steps` steps (the same program) written
  there by `jax.profiler`, and the number of steps traced in its `steps.json` (what
  profile_summary.py reads)."""
  mesh = sharding.make_mesh()
  learner = learners.create(config, dataset, placement.device_data(dataset, mesh), mesh)
  batch, length = config.train.batch_size, config.data.sequence_length
  epoch, variables, opt_state, n = common.member_epoch(
      learner, min(num_steps * batch, len(dataset.train_labels)))
  (variables, opt_state), first = common.first_call(epoch, variables, opt_state, 0)
  began = time.perf_counter()
  with backend.no_compilation('the timed epoch'):
    variables, opt_state = epoch(variables, opt_state, 1)
    jax.block_until_ready(variables)
  seconds = time.perf_counter() - began
  if profile:
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # XLA's ops and kernels, not every Python call
    profiled = min(n, profile_steps * batch)
    with (backend.no_compilation('the profiled epoch'),
          jax.profiler.trace(profile, profiler_options=options)):
      jax.block_until_ready(epoch(variables, opt_state, 2, profiled))
    with open(os.path.join(profile, 'steps.json'), 'w') as f:
      json.dump({'steps': -(-profiled // batch), **common.environment()}, f)
  tokens_per_second = n * length / seconds
  m = config.model
  qkv = jax.ShapeDtypeStruct((batch, length, m.heads, m.width // m.heads), jnp.dtype(m.dtype))
  xla_per_token = learner.flops()['step'] / (batch * length)
  params = learner.params(learner.init(jax.random.key(0)))
  embeddings = dataset.num_classes * config.model.width + config.model.context * config.model.width
  palm_per_token = (6 * (params - embeddings)
                    + 12 * config.model.depth * config.model.width * length)
  return {
      'params': params, 'batch': batch, 'sequence_length': length,
      'microbatches': config.train.microbatches, 'dtype': config.model.dtype,
      'attention': m.attention,
      'attention_kernel': transformer.attention_kernel(m.attention, qkv, qkv, qkv),
      'deterministic_gpu_kernels': backend.deterministic_gpu_kernels(),
      'remat': config.model.remat,
      'steps_timed': n // batch, 'first_epoch': first,
      'seconds': seconds, 'step_ms': 1000 * seconds / (n // batch),
      'tokens_per_second': tokens_per_second,
      'xla_train_flops_per_token': xla_per_token,
      'mfu_xla': tokens_per_second * xla_per_token / peak,
      'palm_flops_per_token': palm_per_token,
      'mfu_palm': tokens_per_second * palm_per_token / peak,
  }


def main():
  args, c, dataset = common.lm_script(__doc__, 'experiments/results/lm/benchmark.json',
                                      steps=400, profile='')
  peak = matmul_peak()
  result = {'config': args.config, **common.environment(), 'matmul_peak': peak,
            'deterministic': c.backend.deterministic,
            **throughput(c, dataset, args.steps, peak['flops'], args.profile)}
  common.write_result(result, args.out)


if __name__ == '__main__':
  main()
