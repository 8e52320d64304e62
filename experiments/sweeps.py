"""Sweeps that test the paper's four findings (experiments/README.md), each one command:

    python experiments/sweeps.py SWEEP [--reduced] [--seeds=3]

SWEEP is one of waiting_time, model_size, replay, learners (Fashion-MNIST, T=10, MLP), fmnist
(those four in turn), reference_mnist and reference_fmnist (every learner with the reference's
settings on MNIST, and on Fashion-MNIST normalized as the reference does), conv_waiting_time (configs/fashion_mnist_conv.py: VGG, several epochs a
round) or lm_waiting_time (configs/lm.py). Every grid point runs once per seed
(`config.seed` = 0, 1, 2: initialization and shuffling; the stream's permutation stays fixed)
in experiments/results/SWEEP/runs/POINT/seedK. A run that finished (summary.json) is read back,
an interrupted one resumes from its checkpoint. Then SWEEP/table.md (mean and standard
deviation over seeds) and the plots of `python -m alma_jax.analyze` (mean over the seeds with a
band of one standard deviation) are written.
`--reduced` runs the same grid on each config's `:tiny` variant with one seed, in minutes,
into experiments/results/SWEEP_reduced/.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alma_jax import analyze, config as alma_config, learners, run  # noqa: E402

MNIST = os.path.join(ROOT, 'configs', 'mnist.py')
FMNIST = os.path.join(ROOT, 'configs', 'fashion_mnist.py')
FMNIST_CONV = os.path.join(ROOT, 'configs', 'fashion_mnist_conv.py')
LM = os.path.join(ROOT, 'configs', 'lm.py')
T10 = {'stream.num_megabatches': 10}  # also in `--reduced` runs, whose `:tiny` configs have T=4

# Every learner over the MLP, and over its mixture-of-experts version: fixed (moe) and grown.
LEARNER_ROWS = ([(name, {'learner.name': name}) for name in learners.names() if name != 'gmoe']
                + [('moe', {'model.name': 'moe_mlp'}),
                   ('gmoe', {'learner.name': 'gmoe', 'model.name': 'moe_mlp'})])

# Every learner as the reference ran it on MNIST (configs/mnist/*.yaml: T=10, w=1, MLP h=64,
# Adadelta, each learner's own early stopping; gMoE growing every round). From scratch is meant
# for replay of all data; the reference has Firefly for VGG only, here it grows the MLP.
REFERENCE_ROWS = [
    ('finetune', {}), ('from_scratch', {'learner.name': 'from_scratch', 'stream.replay': 'all'}),
    *[(name, {'learner.name': name}) for name in ('k_ensemble', 'agg_ensemble', 'gens', 'bagging',
                                                  'boosting')],
    ('moe', {'model.name': 'moe_mlp'}),
    ('gmoe', {'learner.name': 'gmoe', 'model.name': 'moe_mlp', 'learner.grow_every': 1}),
    ('firefly', {'learner.name': 'firefly', 'learner.grow_every': 1})]
# The reference normalizes every 28x28 gray data set with MNIST's statistics.
MNIST_NORMALIZATION = {'data.mean': (0.1307,), 'data.std': (0.3081,)}

# sweep -> (config file, [(grid point, {dotted config key: value})])
SWEEPS = {
    'waiting_time': (FMNIST, [
        (f'w{w}_replay_{replay}', {**T10, 'stream.waiting_time': w, 'stream.replay': replay})
        for replay in ('none', 'all') for w in (1, 2, 5, 10)]),
    'conv_waiting_time': (FMNIST_CONV, [(f'w{w}', {**T10, 'stream.waiting_time': w})
                                        for w in (1, 2, 5, 10)]),
    'model_size': (FMNIST, [(f'h{h}', {'model.hidden': h}) for h in (4, 32, 64, 256)] + [
        (f'{learner}_h{h}', {'model.hidden': h, 'learner.name': learner,
                             'learner.grow_every': 2, 'model.name': model})
        for learner, model in (('gmoe', 'moe_mlp'), ('firefly', 'mlp')) for h in (4, 32)]),
    'replay': (FMNIST, [(f'replay_{replay}', {'stream.replay': replay})
                        for replay in ('none', 'all', 'fraction', 'reservoir')]),
    'learners': (FMNIST, LEARNER_ROWS),
    # (Each round's cosine decay spans its two epochs, however many mega-batches it has.)
    'lm_waiting_time': (LM, [(f'w{w}', {'stream.waiting_time': w}) for w in (1, 2, 5)]),
}
SWEEPS['reference_mnist'] = (MNIST, REFERENCE_ROWS)
SWEEPS['reference_fmnist'] = (FMNIST, [(point, {**overrides, **MNIST_NORMALIZATION})
                                       for point, overrides in REFERENCE_ROWS])
GROUPS = {'fmnist': ('waiting_time', 'model_size', 'replay', 'learners')}


def run_point(config_file: str, variant: str, overrides: dict, seed: int, workdir: str) -> dict:
  """The summary of one run: read back if finished, else run (or resumed)."""
  finished = os.path.join(workdir, run.SUMMARY_FILE)
  if os.path.exists(finished):
    return analyze.Run(workdir).summary()
  with contextlib.redirect_stdout(io.StringIO()):
    return run.run(point_config(config_file, variant, overrides, seed), workdir)


def point_config(config_file: str, variant: str, overrides: dict, seed: int):
  """The config of one grid point and seed, logging to files only."""
  config = alma_config.load(f'{config_file}:{variant}')
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  config.seed = seed
  config.log.update(tensorboard=False, epochs=False)
  return config


def mean_std(values) -> str:
  values = np.asarray(values, float)
  if len(values) == 1:
    return f'{values[0]:.4f}'
  return f'{values.mean():.4f} ± {values.std(ddof=1):.4f}'


def write_table(path: str, points: list[str], summaries: dict, language_model: bool) -> None:
  area, area_name = (('cumulative_loss_per_t', 'test loss area / T') if language_model
                     else ('cer_per_t', 'CER/T'))
  final, final_name = (('final_bits', 'final bits/byte') if language_model
                       else ('final_error', 'final error'))
  lines = [f'| run | seeds | {final_name} | {area_name} | training FLOPs | reference FLOPs | '
           f'params | seconds in rounds |', '|---|---:|---:|---:|---:|---:|---:|---:|']
  for point in points:
    s = summaries[point]
    lines.append(
        f"| {point} | {len(s)} | {mean_std([x[final] for x in s])} | "
        f"{mean_std([x[area] for x in s])} | {np.mean([x['train_flops'] for x in s]):.3g} | "
        f"{np.mean([x['reference_flops'] for x in s]):.3g} | "
        f"{np.mean([x['params'] for x in s]):,.0f} | {np.mean([x['seconds'] for x in s]):.0f} |")
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def sweep(name: str, reduced: bool, seeds: int) -> str:
  config_file, grid = SWEEPS[name]
  variant = 'tiny' if reduced else ''
  out = os.path.join(ROOT, 'experiments', 'results', name + ('_reduced' if reduced else ''))
  summaries = {}
  began = time.perf_counter()
  for point, overrides in grid:
    for seed in range(seeds):
      workdir = os.path.join(out, 'runs', point, f'seed{seed}')
      t0 = time.perf_counter()
      summary = run_point(config_file, variant, overrides, seed, workdir)
      summaries.setdefault(point, []).append(summary)
      print(f'{name}: {point} seed {seed}: final error {summary["final_error"]:.4f}, CER/T '
            f'{summary["cer_per_t"]:.4f}, final loss {summary["final_test_loss"]:.4f} '
            f'({time.perf_counter() - t0:.0f} s)', flush=True)
  points = [point for point, _ in grid]
  language_model = config_file == LM
  write_table(os.path.join(out, 'table.md'), points, summaries, language_model)
  runs = [[analyze.Run(os.path.join(out, 'runs', point, f'seed{seed}')) for seed in range(seeds)]
          for point in points]
  analyze.plot(runs, points, out)
  print(f'{name}: wrote {out}/table.md and plots in {time.perf_counter() - began:.0f} s',
        flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('sweep', choices=sorted(SWEEPS) + sorted(GROUPS))
  parser.add_argument('--reduced', action='store_true', help='tiny configs, one seed')
  parser.add_argument('--seeds', type=int, default=None, help='default: 3 (1 with --reduced)')
  args = parser.parse_args()
  seeds = args.seeds or (1 if args.reduced else 3)
  for name in GROUPS.get(args.sweep, (args.sweep,)):
    sweep(name, args.reduced, seeds)


if __name__ == '__main__':
  main()
