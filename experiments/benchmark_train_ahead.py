"""The demo's first round with and without training the next epoch ahead of the host's
early-stopping decision (`learners.base.TRAIN_AHEAD_BACKENDS`: accelerators only, by default;
here on whatever backend it finds).

One finetune round on Fashion-MNIST mega-batch 1 with the demo config's early stopping, from
the same initial state and key, after one round of each that compiles (nothing may compile in
the timed ones); the best of `repeats` of each, alternating. Checks that both end with the same
variables and epochs. Run from the repository root:

  python experiments/benchmark_train_ahead.py [--repeats=5]

writes experiments/results/train_ahead_<backend>.json (or --out).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
from alma_jax import backend, config as alma_config, data, learners, sharding  # noqa: E402
from alma_jax import stream as alma_stream  # noqa: E402
from alma_jax.learners import base  # noqa: E402
from alma_jax.placement import device_data  # noqa: E402


def compare(repeats: int) -> dict:
  config = learners.with_defaults(alma_config.load(os.path.join(ROOT, 'configs',
                                                                'fashion_mnist.py')))
  dataset = data.load(config.data)
  mesh = sharding.make_mesh()
  learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  stream = alma_stream.make_stream(len(dataset.train_labels), config.stream.num_megabatches,
                                   config.stream.permutation_seed,
                                   config.stream.validation_fraction)
  state = alma_stream.arrive(alma_stream.init_state(stream.num_examples))
  round_data, _ = alma_stream.next_round(state, stream, config.stream, config.seed)
  start = learner.init(jax.random.key(config.seed))
  default = base.TRAIN_AHEAD_BACKENDS
  backends = {'ahead': (jax.default_backend(),), 'waiting': ()}

  def round_seconds(name):
    base.TRAIN_AHEAD_BACKENDS = backends[name]
    began = time.perf_counter()
    state, report = learner.train_round(start, round_data, jax.random.key(1))
    jax.block_until_ready(state.variables)
    return time.perf_counter() - began, state, report

  try:
    ends = {name: round_seconds(name)[1:] for name in backends}  # compiles
    best = {name: float('inf') for name in backends}
    with backend.no_compilation('the timed rounds'):
      for _ in range(repeats):
        for name in backends:
          best[name] = min(best[name], round_seconds(name)[0])
  finally:
    base.TRAIN_AHEAD_BACKENDS = default
  (ahead, ahead_report), (waiting, waiting_report) = ends['ahead'], ends['waiting']
  same = ahead_report == waiting_report and all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ahead.variables),
                                           jax.tree.leaves(waiting.variables)))
  epochs = ahead_report.epochs
  return {'epochs': epochs, 'examples_per_epoch': len(round_data.train), 'repeats': repeats,
          'round_seconds': best, 'ms_per_epoch': {n: 1e3 * s / epochs for n, s in best.items()},
          'waiting_over_ahead': best['waiting'] / best['ahead'], 'same_round': bool(same)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  backend.configure(alma_config.base().backend)  # as a run would, before the backend starts
  common.write_result({**common.environment(), **compare(args.repeats)},
                      args.out or f'experiments/results/train_ahead_{jax.default_backend()}.json')


if __name__ == '__main__':
  main()
