"""Every learner on the same stream, side by side: final error, CER/T, params, FLOPs, wall time.

Fashion-MNIST (configs/fashion_mnist.py), T=10, waiting time 1, no replay, MLP h=64 members.
Each learner runs in its own workdir under --out; finished runs are read back, not recomputed,
and a stopped sweep resumes where it stopped. Run from the repository root:

  python experiments/learners_table.py [--variant=tiny] [--learners=finetune,gens]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alma_jax import config as alma_config, learners, run  # noqa: E402


def run_learner(name: str, variant: str, out: str) -> dict:
  config = alma_config.load(os.path.join(ROOT, 'configs', 'fashion_mnist.py'), variant)
  config.learner.name = name
  config.log.tensorboard = False
  began = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):
    summary = run.run(config, os.path.join(out, name))
  print(f'{name}: final error {summary["final_error"]:.4f} ({time.perf_counter() - began:.0f} s)',
        flush=True)
  return summary


def table(summaries: dict) -> str:
  lines = ['| learner | final error | CER/T | params | training FLOPs | reference FLOPs | '
           'inference FLOPs/example | wall time (s) |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for name, s in summaries.items():
    lines.append(f"| {name} | {s['final_error']:.4f} | {s['cer_per_t']:.4f} | "
                 f"{int(s['params']):,d} | {s['train_flops']:.3g} | {s['reference_flops']:.3g} | "
                 f"{s['inference_flops']:.3g} | {s['seconds']:.0f} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='', help="'' for the full protocol, 'tiny' for minutes")
  parser.add_argument('--learners', default=','.join(learners.names()))
  parser.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results', 'learners'))
  args = parser.parse_args()
  out = args.out + ('_' + args.variant if args.variant else '')
  summaries = {name: run_learner(name, args.variant, os.path.join(out, 'runs'))
               for name in args.learners.split(',')}
  text = table(summaries)
  print('\n' + text)
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write(text + '\n\nTraining FLOPs: compiled train steps (forward + backward + update) x '
            'steps run, plus growth measurements; reference FLOPs: forward multiply-adds x '
            'examples trained on (the reference code\'s convention). Wall time: the arrivals '
            '(training and test evaluation), without start-up.\n')
  with open(os.path.join(out, 'summaries.json'), 'w') as f:
    json.dump(summaries, f, indent=2)


if __name__ == '__main__':
  main()
