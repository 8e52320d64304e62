"""How much sooner a second identical demo run reaches its first arrival (#12's start-up
target: 2x on a CPU), over several pairs of runs, and where the second run's time goes:

    python experiments/benchmark_startup.py [--pairs=5] [--config=configs/fashion_mnist.py]

Each pair is two fresh processes of `python -m alma_jax.main` (benchmark_accelerator.main_run):
the first with empty caches (compilation, decoded data), the second with them filled. The
second run's time to its first row is split into: the interpreter and the imports (a process
that only imports `alma_jax.main`, timed apart), the run's start-up (its summary's
`startup_seconds`: config, data, learner, initial state), the first round's training at the
run's steady rate (row 1's epochs at rows 2.. 's seconds an epoch), and the rest (tracing,
lowering and loading the programs from the cache, the first round's evaluation, checkpoint,
row). `best_ratio` is the ratio a second run would reach if it spent nothing but the
interpreter, the imports and the first round's training. Writes
experiments/results/startup_<backend>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common
import jax

import benchmark_accelerator

ROOT = benchmark_accelerator.ROOT


def import_seconds() -> float:
  """Seconds for a fresh interpreter to import the driver (what every run pays first)."""
  began = time.perf_counter()
  subprocess.run([sys.executable, '-c', 'import alma_jax.main'], cwd=ROOT, check=True)
  return time.perf_counter() - began


def second_run_parts(workdir: str, run: dict) -> dict:
  """The second run's first row's time, split (see the module's docstring)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  steady = (sum(r['seconds'] for r in rows[1:] if r['trained'])
            / sum(r['epochs'] for r in rows[1:] if r['trained']))
  return {'startup_s': run['startup_s'], 'first_round_s': rows[0]['seconds'],
          'first_round_epochs': rows[0]['epochs'], 'steady_epoch_s': steady,
          'first_round_training_s': rows[0]['epochs'] * steady}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pairs', type=int, default=5)
  parser.add_argument('--config', default='configs/fashion_mnist.py')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  config = os.path.join(ROOT, args.config)
  pairs = []
  for i in range(args.pairs):
    with tempfile.TemporaryDirectory() as tmp:
      cache = os.path.join(tmp, 'cache')
      first = benchmark_accelerator.main_run(config, os.path.join(tmp, 'first'), cache)
      again = benchmark_accelerator.main_run(config, os.path.join(tmp, 'again'), cache)
      pair = {'first_arrival_s': first['first_arrival_s'],
              'again_first_arrival_s': again['first_arrival_s'],
              'ratio': first['first_arrival_s'] / again['first_arrival_s'],
              'again_compilations': again['compilations'],
              'again_compilations_from_cache': again['compilations_from_cache'],
              'again': second_run_parts(os.path.join(tmp, 'again'), again)}
    pairs.append(pair)
    print(f"pair {i + 1}: {pair['first_arrival_s']:.2f} s, then {pair['again_first_arrival_s']:.2f}"
          f" s: {pair['ratio']:.2f}x", flush=True)
  imports = statistics.median(import_seconds() for _ in range(5))
  median = lambda f: statistics.median(f(p) for p in pairs)
  training = median(lambda p: p['again']['first_round_training_s'])
  again = median(lambda p: p['again_first_arrival_s'])
  startup = median(lambda p: p['again']['startup_s'])
  result = {
      **common.environment(), 'config': args.config, 'pairs': pairs,
      'median_ratio': median(lambda p: p['ratio']),
      'median_first_arrival_s': median(lambda p: p['first_arrival_s']),
      'median_again_first_arrival_s': again,
      'again_parts_median_s': {
          'interpreter_and_imports': imports, 'startup': startup,
          'first_round_training': training,
          'rest': again - imports - startup - training},
      'best_ratio': median(lambda p: p['first_arrival_s']) / (imports + training)}
  common.write_result(result, args.out or os.path.join(
      ROOT, 'experiments', 'results', f'startup_{jax.default_backend()}.json'))


if __name__ == '__main__':
  main()
