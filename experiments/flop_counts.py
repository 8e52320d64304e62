"""The FLOP counts a run records, per config, on this backend: run it on two backends and compare.

    python experiments/flop_counts.py [--out=experiments/results/flops_<backend>.json]

For the demo MLP, the default LM and the GPT-2-small shape (with the attention 'auto' picks and
with XLA's; counted on the CPU's lowering, so the same on every backend): one member's train step FLOPs, forward FLOPs per example and the
reference convention's (fvcore's) FLOPs per example (`MemberLearner.flops`).
"""
from __future__ import annotations

import argparse
import os

import common
import jax

from alma_jax import config as alma_config, data, learners, placement, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = (('fashion_mnist.py', 'auto'), ('lm.py', 'auto'), ('lm.py:gpt2_small', 'auto'),
           ('lm.py:gpt2_small', 'xla'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'experiments', 'results', f'flops_{jax.default_backend()}.json'))
  args = parser.parse_args()
  counts = {}
  for spec, attention in CONFIGS:
    c = alma_config.load(os.path.join(ROOT, 'configs', spec))
    if 'attention' in c.model:
      c.model.attention = attention
    dataset = data.load(c.data)
    mesh = sharding.make_mesh()
    learner = learners.create(c, dataset, placement.device_data(dataset, mesh), mesh)
    counts[f'{spec} (attention {attention})' if 'attention' in c.model else spec] = (
        learner.flops())
  common.write_result({**common.environment(), 'flops': counts}, args.out)


if __name__ == '__main__':
  main()
