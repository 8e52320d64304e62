"""Training throughput of the default language model, and its model FLOP utilization (MFU).

    python experiments/benchmark_lm.py [--config=configs/lm.py] [--steps=400]

Times compiled epochs of the config's train step (after compiling) on the config's data, and
this machine's float32 matmul peak (the best of jitted square matmuls of a few sizes). MFU =
achieved model FLOP/s / peak, with model FLOPs per token counted two ways: XLA's cost analysis
of the train step (forward, backward, AdamW update), and PaLM's 6 N + 12 layers x width x
context (N: parameters without the embeddings). Writes experiments/results/lm/benchmark.json.
"""
from __future__ import annotations

import time

import common
import jax
import numpy as np

from alma_jax import learners, run, sharding, steps


def matmul_peak(sizes=(256, 512, 1024, 2048), seconds: float = 2.0) -> float:
  """Best float32 FLOP/s of a jitted (n, n) @ (n, n) on this machine."""
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ a)
    f(a).block_until_ready()
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
      f(a).block_until_ready()
      count += 1
    best = max(best, 2 * n ** 3 * count / (time.perf_counter() - began))
  return best


def main():
  args, c, dataset = common.lm_script(__doc__, 'experiments/results/lm/benchmark.json',
                                      steps=400)
  mesh = sharding.make_mesh()
  learner = learners.create(c, dataset, run.device_data(dataset, mesh), mesh)
  batch, length = c.train.batch_size, c.data.sequence_length
  n = min(args.steps * batch, len(dataset.train_labels))
  indices, n = steps.pad_indices(np.arange(n)[None], batch)
  weights = (np.arange(indices.shape[1]) < n).astype(np.float32)[None]
  variables = learner.new_members(jax.random.key(0), 1)
  opt_state = learner.init_optimizer(variables)
  keys = jax.random.split(jax.random.key(1), 1)
  epoch = lambda v, o, e: learner.trainer.train_epoch(
      v, o, learner.data.train_images, learner.data.train_labels, indices, weights, n, keys, e)
  variables, opt_state = epoch(variables, opt_state, 0)  # compiles
  jax.block_until_ready(variables)
  began = time.perf_counter()
  variables, opt_state = epoch(variables, opt_state, 1)
  jax.block_until_ready(variables)
  seconds = time.perf_counter() - began
  tokens_per_second = n * length / seconds
  xla_per_token = learner.flops()['step'] / (batch * length)
  params = learner.params(learner.init(jax.random.key(0)))
  embeddings = 256 * c.model.width + length * c.model.width
  palm_per_token = 6 * (params - embeddings) + 12 * c.model.depth * c.model.width * length
  peak = matmul_peak()
  result = {
      'config': args.config, 'device': jax.devices()[0].device_kind,
      'devices': jax.device_count(), 'params': params, 'batch': batch, 'sequence_length': length,
      'steps_timed': n // batch, 'seconds': seconds, 'tokens_per_second': tokens_per_second,
      'matmul_peak_flops': peak,
      'xla_train_flops_per_token': xla_per_token,
      'mfu_xla': tokens_per_second * xla_per_token / peak,
      'palm_flops_per_token': palm_per_token,
      'mfu_palm': tokens_per_second * palm_per_token / peak,
  }
  common.write_result(result, args.out)


if __name__ == '__main__':
  main()
