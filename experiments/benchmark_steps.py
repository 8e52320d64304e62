"""Training throughput (examples/s) of the compiled train step of each model, on this machine.

Times epochs of batch-128 steps of one member on Fashion-MNIST, after a first epoch that
compiles (nothing may compile in the timed ones), for the MLP of configs/fashion_mnist.py and the VGG of configs/fashion_mnist_conv.py,
with the configs' `train.compiled_epoch` or the one given. Run from the repository root:

  python experiments/benchmark_steps.py [--examples=5376] [--epochs=3] [--compiled_epoch=auto]

writes experiments/results/steps_<backend>_<compiled_epoch>.json (or --out).
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
from alma_jax.placement import device_data  # noqa: E402

CONFIGS = {'mlp (h=64)': 'fashion_mnist.py', 'vgg (c=16)': 'fashion_mnist_conv.py'}


def examples_per_second(config_file: str, examples: int, epochs: int, compiled_epoch: str) -> float:
  config = alma_config.load(os.path.join(ROOT, 'configs', config_file))
  config.train.compiled_epoch = compiled_epoch
  dataset = data.load(config.data)
  mesh = sharding.make_mesh()
  learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  epoch, variables, opt_state, n = common.member_epoch(learner, examples)
  variables, opt_state = epoch(variables, opt_state, 0)  # compiles
  jax.block_until_ready(variables)
  began = time.perf_counter()
  with backend.no_compilation(f'{config_file} epochs'):
    for e in range(1, epochs + 1):
      variables, opt_state = epoch(variables, opt_state, e)
    jax.block_until_ready(variables)
  return epochs * n / (time.perf_counter() - began)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--examples', type=int, default=5376)
  parser.add_argument('--epochs', type=int, default=3)
  parser.add_argument('--compiled_epoch', choices=('auto', 'yes', 'no'), default='auto',
                      help="'yes': an epoch is one compiled loop; 'no': one compiled call a step")
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  backend.configure(alma_config.base().backend)  # as a run would, before the backend starts
  rates = {name: examples_per_second(config_file, args.examples, args.epochs,
                                     args.compiled_epoch)
           for name, config_file in CONFIGS.items()}
  common.write_result({**common.environment(), 'examples': args.examples, 'epochs': args.epochs,
                       'compiled_epoch': args.compiled_epoch, 'examples_per_second': rates},
                      args.out or f'experiments/results/steps_{jax.default_backend()}_'
                      f'{args.compiled_epoch}.json')


if __name__ == '__main__':
  main()
