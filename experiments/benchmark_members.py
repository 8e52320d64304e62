"""k members trained side by side through vmap, against k single-model rounds one after another.

One round of the demo protocol's data (Fashion-MNIST mega-batch 1), a fixed number of epochs
(early stopping off, so both do the same work), after a first round that compiles (nothing
may compile in the timed rounds). Run from the
repository root:

  python experiments/benchmark_members.py [--members=4] [--epochs=5] [--repeats=3]

writes experiments/results/members_<backend>.json (the best of `repeats` timings of each).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
from alma_jax import backend, config as alma_config, data, learners, sharding  # noqa: E402
from alma_jax import stream as alma_stream  # noqa: E402
from alma_jax.placement import device_data  # noqa: E402


def timed_round(learner, round_data, rounds: int, repeats: int) -> float:
  """The best of `repeats` timings of `rounds` training rounds from the learner's initial
  state (compiled first)."""
  state = learner.init(jax.random.key(0))
  jax.block_until_ready(learner.train_round(state, round_data, jax.random.key(1))[0])
  best = float('inf')
  with backend.no_compilation('the timed rounds'):
    for _ in range(repeats):
      began = time.perf_counter()
      for r in range(rounds):
        jax.block_until_ready(learner.train_round(state, round_data, jax.random.key(2 + r))[0])
      best = min(best, time.perf_counter() - began)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--members', type=int, default=4)
  parser.add_argument('--epochs', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  backend.configure(alma_config.base().backend)  # as a run would, before the backend starts
  config = alma_config.load(os.path.join(ROOT, 'configs', 'fashion_mnist.py'))
  config.train.update(max_epochs=args.epochs, patience=args.epochs)
  config.learner.num_members = args.members
  dataset = data.load(config.data)
  mesh = sharding.make_mesh()
  on_device = device_data(dataset, mesh)
  stream = alma_stream.make_stream(len(dataset.train_labels), config.stream.num_megabatches)
  state = alma_stream.arrive(alma_stream.init_state(stream.num_examples))
  round_data, _ = alma_stream.next_round(state, stream, config.stream, config.seed)

  config.learner.name = 'k_ensemble'
  together = timed_round(learners.create(config, dataset, on_device, mesh), round_data, 1,
                         args.repeats)
  config.learner.name = 'finetune'
  apart = timed_round(learners.create(config, dataset, on_device, mesh), round_data,
                      args.members, args.repeats)
  common.write_result({
      **common.environment(), 'members': args.members, 'epochs': args.epochs,
      'examples': len(round_data.train), 'repeats': args.repeats,
      'vmapped_seconds': together, 'single_model_rounds_seconds': apart,
      'separate_over_vmapped': apart / together,
  }, args.out or f'experiments/results/members_{jax.default_backend()}.json')


if __name__ == '__main__':
  main()
