"""alma_jax against a plain PyTorch baseline on the demo protocol, side by side.

The demo protocol is configs/fashion_mnist.py: Fashion-MNIST, T=10 mega-batches, waiting time 1,
no replay, `finetune` of an MLP 784->64->64->10 with Adadelta (lr 1.0, rho 0.9, eps 1e-6), batch
128, early stopping (patience 25, delta 0.001, at most 100 epochs), a fresh optimizer every round
and the best-validation parameters kept. Both implementations see the same arrays, mega-batches
and validation splits. Run from the repository root:

  python experiments/benchmark_torch.py [--variant=tiny] [--out=results.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

try:
  import torch
except ImportError:
  sys.exit('benchmark_torch.py needs PyTorch, which is not a dependency of alma_jax. '
           'Install it with: pip install torch==2.13.0')
import common
import numpy as np

from alma_jax import config as alma_config, data, learners, stream as alma_stream
from alma_jax import run as alma_run


def load_config(variant: str):
  """The config of configs/fashion_mnist.py (with `variant`), TensorBoard off, the keys it
  leaves to the learner (early stopping) at the learner's defaults, as a run reads them."""
  config = alma_config.load(os.path.join(ROOT, 'configs', f'fashion_mnist.py:{variant}'))
  config.log.tensorboard = False
  return learners.with_defaults(config)


def bench_alma_jax(config) -> dict:
  """Runs alma_jax end to end in a fresh workdir; its summary, epochs and timings."""
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, 'run')
    began = time.perf_counter()
    summary = alma_run.run(config, workdir)
    wall = time.perf_counter() - began
    with open(os.path.join(workdir, alma_run.METRICS_FILE)) as f:
      rows = [json.loads(line) for line in f]
  return {'wall_s': wall, 'rounds_s': summary['seconds'], 'startup_s': summary['startup_seconds'],
          'compile_s': summary['compile_seconds'], 'compilations': summary['compilations'],
          'compilations_from_cache': summary['compilations_from_cache'],
          'final_error': summary['final_error'],
          'train_examples': summary['train_examples'],
          'epochs': [int(r['epochs']) for r in rows if r['trained']]}


def _mlp(config, in_features: int) -> torch.nn.Module:
  layers, width = [], in_features
  for _ in range(config.model.num_layers):
    layers += [torch.nn.Linear(width, config.model.hidden), torch.nn.ReLU()]
    width = config.model.hidden
  layers.append(torch.nn.Linear(width, config.data.num_classes))
  return torch.nn.Sequential(*layers)


def _tensors(dataset, images, labels, device):
  """uint8 images -> normalized, flattened float32 (as `Dataset.preprocess`); int64 labels."""
  x = images.astype(np.float32) / 255.0
  x = (x - np.asarray(dataset.mean, np.float32)) / np.asarray(dataset.std, np.float32)
  return (torch.from_numpy(x.reshape(len(x), -1)).to(device),
          torch.from_numpy(labels.astype(np.int64)).to(device))


@torch.no_grad()
def _accuracy(model, x, y) -> float:
  model.eval()
  return (model(x).argmax(-1) == y).sum().item() / len(y)


def _index_batches(x, y, train, batch_size, generator):
  """Shuffled batches by indexing the tensors directly (the fastest plain-PyTorch loop)."""
  order = train[torch.randperm(len(train), generator=generator).to(train.device)]
  return ((x[batch], y[batch]) for batch in order.split(batch_size))


def _loader_batches(x, y, train, batch_size, generator):
  """Shuffled batches from a DataLoader over a TensorDataset (as in PyTorch's tutorials and the
  ALMA reference code)."""
  dataset = torch.utils.data.TensorDataset(x[train].cpu(), y[train].cpu())
  return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                     generator=generator)


def _fit(model, x, y, train, valid, config, generator, batches) -> int:
  """One round as `alma_jax.learners.base.fit`; loads the best-validation state; epochs run."""
  optimizer = torch.optim.Adadelta(model.parameters(), lr=config.optimizer.learning_rate,
                                   rho=0.9, eps=1e-6)
  train_config = config.train
  train = torch.from_numpy(train).long().to(x.device)
  valid = torch.from_numpy(valid).long().to(x.device)
  best_accuracy, bad_epochs, best_state = -float('inf'), 0, None
  for epoch in range(train_config.max_epochs):
    model.train()
    for inputs, targets in batches(x, y, train, train_config.batch_size, generator):
      inputs, targets = inputs.to(x.device), targets.to(x.device)
      optimizer.zero_grad()
      torch.nn.functional.cross_entropy(model(inputs), targets).backward()
      optimizer.step()
    accuracy = _accuracy(model, x[valid], y[valid])
    if accuracy > best_accuracy + train_config.patience_delta:
      best_accuracy, bad_epochs, best_state = accuracy, 0, copy.deepcopy(model.state_dict())
    else:
      bad_epochs += 1
    if bad_epochs >= train_config.patience:
      break
  model.load_state_dict(best_state)
  return epoch + 1


def bench_torch(config, batches, device: str = 'cpu') -> dict:
  """The same protocol in plain PyTorch on `device` (data there too), timed end to end and per
  arrival."""
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(config.seed)
  generator = torch.Generator().manual_seed(config.seed)
  began = time.perf_counter()
  dataset = data.load(config.data)
  x, y = _tensors(dataset, dataset.train_images, dataset.train_labels, device)
  x_test, y_test = _tensors(dataset, dataset.test_images, dataset.test_labels, device)
  s = config.stream
  stream = alma_stream.make_stream(len(y), s.num_megabatches, s.permutation_seed,
                                   s.validation_fraction)
  state = alma_stream.init_state(stream.num_examples)
  model = _mlp(config, x.shape[1]).to(device)
  rounds_s, train_examples, epochs, error = 0.0, 0, [], float('nan')
  print(f"{'t':>4s}  {'epochs':>6s}  {'test_error':>10s}  {'seconds':>8s}  (torch)", flush=True)
  for t in range(1, stream.num_megabatches + 1):
    arrival_began = time.perf_counter()
    state = alma_stream.arrive(state)
    n = 0
    if alma_stream.should_train(t, s.waiting_time, stream.num_megabatches, s.train_on_last):
      round_data, state = alma_stream.next_round(state, stream, s, config.seed)
      n = _fit(model, x, y, round_data.train, round_data.valid, config, generator, batches)
      epochs.append(n)
      train_examples += n * len(round_data.train)
    error = 1.0 - _accuracy(model, x_test, y_test)
    seconds = time.perf_counter() - arrival_began
    rounds_s += seconds
    print(f'{t:>4d}  {n:>6d}  {error:10.4f}  {seconds:8.2f}', flush=True)
  return {'wall_s': time.perf_counter() - began, 'rounds_s': rounds_s, 'final_error': error,
          'train_examples': float(train_examples), 'epochs': epochs}


def table(results: dict) -> str:
  """The markdown table of the results, and the speed-ups of alma_jax over each torch loop."""
  lines = ['| implementation | wall time (s) | train examples/s (rounds) | '
           'train examples/s (end to end) | final test error | epochs per round |',
           '|---|---:|---:|---:|---:|---|']
  for name, r in results.items():
    lines.append(f"| {name} | {r['wall_s']:.1f} | {r['train_examples'] / r['rounds_s']:,.0f} | "
                 f"{r['train_examples'] / r['wall_s']:,.0f} | {r['final_error']:.4f} | "
                 f"{', '.join(map(str, r['epochs']))} |")
  ours = results['alma_jax']
  lines.append('')
  for name, r in results.items():
    if name != 'alma_jax':
      lines.append(f"alma_jax vs {name}: {r['wall_s'] / ours['wall_s']:.2f}x wall time, "
                   f"{ours['train_examples'] / ours['rounds_s'] / (r['train_examples'] / r['rounds_s']):.2f}x "
                   f"training examples/s")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='', help="'' for the full protocol, 'tiny' for a smoke run")
  parser.add_argument('--out', default='', help='optional path of a JSON file for the results')
  args = parser.parse_args()
  config = load_config(args.variant)
  results = {'alma_jax': bench_alma_jax(config),
             'torch, DataLoader': bench_torch(config, _loader_batches),
             'torch, index batches': bench_torch(config, _index_batches)}
  print('\n' + table(results))
  if args.out:
    common.write_result({**common.environment(), 'variant': args.variant, 'torch_device': 'cpu',
                         'results': results},
                        args.out, show=False)


if __name__ == '__main__':
  main()
