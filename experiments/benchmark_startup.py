"""How much sooner a second identical demo run reaches its first arrival (#12's start-up
target: 2x on a CPU), over several pairs of runs, and where the second run's time goes:

    python experiments/benchmark_startup.py [--pairs=5] [--config=configs/fashion_mnist.py]

A pair is two fresh processes of `python -m alma_jax.main` (benchmark_accelerator.main_run),
the first with empty caches (compilation, decoded data), the second with them filled. Each is
timed from the command to two moments: the run reaching its first arrival (`startup_wall`: the
interpreter, the imports and the run's start-up: data, learner, initial state; the table's
header is printed) and that arrival's row (`first_arrival`: also the round, its test
evaluation and checkpoint), and the pair's ratio of each (`startup_ratio`, `ratio`).

The second run's time to its first row is split, per pair, into: `startup` (its summary's
`startup_seconds`: data, learner, initial state), `first_round` (row 1's seconds: the round
and its test evaluation) and `outside_run` (the rest: the interpreter, the imports, the
driver's checks, and after the round its checkpoint and row). `first_round` is split again
into its training and evaluation at the run's steady rate (row 1's epochs at the seconds an
epoch of the later rounds, which the config must train on data of the same size: the demo
does) and the `first_round_extra` over that rate (the programs traced, lowered and loaded,
first calls). `compile` is the run's own count of seconds spent tracing, lowering and loading
programs, wherever they fell. `best_ratio` is the row's ratio a second run would reach if its
start-up and its first round's extra cost nothing. Medians over the pairs; writes
experiments/results/startup_<backend>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import common
import jax

import benchmark_accelerator

ROOT = benchmark_accelerator.ROOT


def second_run_parts(workdir: str, run: dict) -> dict:
  """The second run's time to its first row, split (see the module's docstring)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  later = [r for r in rows[1:] if r['trained']]
  if not rows[0]['trained'] or not later:
    raise ValueError('the config must train at arrival 1 and at a later arrival (the steady '
                     'rate an epoch is read off the later rounds)')
  steady = sum(r['seconds'] for r in later) / sum(r['epochs'] for r in later)
  training = rows[0]['epochs'] * steady
  return {'startup': run['startup_s'], 'first_round': rows[0]['seconds'],
          'outside_run': run['first_arrival_s'] - run['startup_s'] - rows[0]['seconds'],
          'first_round_training': training, 'first_round_extra': rows[0]['seconds'] - training,
          'compile': run['compile_s'], 'first_round_epochs': rows[0]['epochs'],
          'steady_epoch': steady}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pairs', type=int, default=5)
  parser.add_argument('--config', default='configs/fashion_mnist.py')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  if args.pairs < 1:
    parser.error(f'--pairs={args.pairs}: at least one pair')
  config = os.path.join(ROOT, args.config)
  pairs = []
  for i in range(args.pairs):
    with tempfile.TemporaryDirectory() as tmp:
      cache = os.path.join(tmp, 'cache')
      first = benchmark_accelerator.main_run(config, os.path.join(tmp, 'first'), cache)
      again = benchmark_accelerator.main_run(config, os.path.join(tmp, 'again'), cache)
      parts = second_run_parts(os.path.join(tmp, 'again'), again)
      pair = {'startup_wall_s': first['startup_wall_s'],
              'again_startup_wall_s': again['startup_wall_s'],
              'startup_ratio': first['startup_wall_s'] / again['startup_wall_s'],
              'first_arrival_s': first['first_arrival_s'],
              'again_first_arrival_s': again['first_arrival_s'],
              'ratio': first['first_arrival_s'] / again['first_arrival_s'],
              'best_ratio': first['first_arrival_s'] / (parts['outside_run']
                                                        + parts['first_round_training']),
              'again_compilations': again['compilations'],
              'again_compilations_from_cache': again['compilations_from_cache'],
              'again_s': parts}
    pairs.append(pair)
    print(f"pair {i + 1}: reached the first arrival after {pair['startup_wall_s']:.2f} s, then "
          f"{pair['again_startup_wall_s']:.2f} s: {pair['startup_ratio']:.2f}x; its row after "
          f"{pair['first_arrival_s']:.2f} s, then {pair['again_first_arrival_s']:.2f} s: "
          f"{pair['ratio']:.2f}x", flush=True)
  median = lambda f: statistics.median(f(p) for p in pairs)
  result = {
      **common.environment(), 'config': args.config, 'pairs': pairs,
      'median_startup_ratio': median(lambda p: p['startup_ratio']),
      'median_startup_wall_s': median(lambda p: p['startup_wall_s']),
      'median_again_startup_wall_s': median(lambda p: p['again_startup_wall_s']),
      'median_ratio': median(lambda p: p['ratio']),
      'median_best_ratio': median(lambda p: p['best_ratio']),
      'median_first_arrival_s': median(lambda p: p['first_arrival_s']),
      'median_again_first_arrival_s': median(lambda p: p['again_first_arrival_s']),
      'median_again_s': {k: median(lambda p: p['again_s'][k]) for k in pairs[0]['again_s']}}
  common.write_result(result, args.out or os.path.join(
      ROOT, 'experiments', 'results', f'startup_{jax.default_backend()}.json'))


if __name__ == '__main__':
  main()
