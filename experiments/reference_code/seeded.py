"""The reference code's MNIST entry point with a seed: the reference seeds only the mega-batch
permutation (432) and leaves torch unseeded, so its runs cannot be repeated; this seeds python,
numpy and torch from `+seed=N` and then runs the reference's `StreamTrainer` on the config.

Run by run.sh (with `--config-path` pointing at the reference's configs/mnist); it needs the
reference checkout on PYTHONPATH. Uses one CPU thread.
"""
import random

import hydra
import numpy
import torch


@hydra.main(config_path=None, config_name=None)
def main(cfg):
  from crlapi.benchmark import StreamTrainer
  torch.multiprocessing.set_start_method('spawn')
  seed = int(cfg.get('seed', 0))
  random.seed(seed)
  numpy.random.seed(seed)
  torch.manual_seed(seed)
  torch.set_num_threads(1)
  StreamTrainer().run(cfg)


if __name__ == '__main__':
  main()
