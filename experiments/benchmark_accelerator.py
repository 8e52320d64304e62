"""alma_jax on whatever backend it finds (CPU, GPU, TPU), in one command of a few minutes:

    python experiments/benchmark_accelerator.py [--out=PATH] [--only=SECTION,...] [--profile=DIR]

Sections, in this order (each writes its part of the JSON as soon as it is measured, and a
section that fails records its error and the others still run):
  peak        the matmul peak that MFU is measured against (bfloat16 on accelerators, float32
              on CPUs), measured here;
  lm_gpt2     the GPT-2-small shape (width 768, 12 blocks, 12 heads, 1024 tokens, batch 16;
              bfloat16 on accelerators) inside a compiled ALMA epoch: tokens/s and MFU, with
              the attention the config picks ('auto': on a GPU under deterministic kernels,
              Pallas's flash attention, as cuDNN's fails there); on CPUs: batch 1, a few
              steps (benchmark_attention.py compares the kernels);
  demo        the demo protocol (configs/fashion_mnist.py) end to end, three processes: with an
              empty compilation cache, again with it filled, and killed after arrival 2 and
              resumed; time to reach the first arrival and to its row, start-up,
              compilation and time in rounds apart, and whether the three give identical rows;
  torch       the demo protocol in plain PyTorch on the same device (index batches, data on the
              device), when torch is importable;
  lm_runs     the LM config end to end, twice and once killed after arrival 2 and resumed:
              identical rows (configs/lm.py on accelerators, its :tiny variant on CPUs);
  nondeterministic  (GPUs) the demo and the GPT-2-small step again with
              config.backend.deterministic=False (kernels XLA autotunes, some accumulating in
              a varying order): the cost of determinism;
  steps       MLP and VGG train-step examples/s (benchmark_steps.py);
  lm_default  the default LM config's step (configs/lm.py): tokens/s and MFU;
  lm_gpt2_medium  (accelerators) GPT-2 medium's shape (configs/lm.py:gpt2_medium: 303.6M
              parameters, blocks scanned and recomputed, FSDP over the devices present).
Measured as a run of the default config runs (deterministic GPU kernels). Every timed region is
checked to compile nothing. Records each section's seconds (`section_seconds`). Writes
experiments/results/accelerator_<backend>.json by default. `--profile=DIR`: a `jax.profiler`
trace of 3 GPT-2-small steps in DIR/lm_gpt2 and, on GPUs, of the non-deterministic ones in
DIR/lm_gpt2_nondeterministic (profile_summary.py reads each): which kernels determinism slows.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import common
import jax

from alma_jax import backend, config as alma_config, data, metrics
import benchmark_lm
import benchmark_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ('peak', 'lm_gpt2', 'demo', 'torch', 'lm_runs', 'nondeterministic', 'steps',
            'lm_default', 'lm_gpt2_medium')
ROW_FIELDS = ('t', 'trained', 'test_error', 'test_loss', 'train_flops', 'valid_flops',
              'reference_flops', 'epochs', 'params', 'inference_flops')


def main_run(config: str, workdir: str, cache: str, kill_after: int = 0,
             overrides: tuple[str, ...] = (), env: dict | None = None) -> dict:
  """`python -m alma_jax.main` in a fresh process, its compilation cache `cache` and its
  decoded data (gunzipped idx files, tokenized corpora) beside it: seconds from the command to
  the run reaching its first arrival (`startup_wall_s`: the interpreter, the imports and the
  run's start-up, until the table's header is printed) and to that arrival's row
  (`first_arrival_s`: also its round, test evaluation and checkpoint; a resumed run prints the
  rows it restored with the header), wall time, its summary; with `kill_after`, SIGKILLed once
  that arrival's row is printed."""
  command = [sys.executable, '-m', 'alma_jax.main', f'--config={config}',
             f'--workdir={workdir}', '--config.log.tensorboard=False',
             f'--config.backend.compilation_cache={cache}',
             f'--config.data.cache_dir={cache}_data', *overrides]
  began = time.perf_counter()
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
  first = reached = None
  for line in process.stdout:
    fields = line.split()
    if reached is None and line.rstrip('\n') == metrics.TABLE_HEADER:
      reached = time.perf_counter() - began
    if fields and fields[0].isdigit():
      first = first or time.perf_counter() - began
      if kill_after and int(fields[0]) == kill_after:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return {'killed_after_arrival': kill_after}
  stderr = process.stderr.read()
  if process.wait():
    raise _failed(command, stderr)
  if reached is None or first is None:
    raise RuntimeError(f'{" ".join(command)} printed no table header or no row (the header '
                       f'the benchmark waits for: {metrics.TABLE_HEADER!r})')
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  return {'startup_wall_s': reached, 'first_arrival_s': first,
          'wall_s': time.perf_counter() - began,
          'startup_s': summary['startup_seconds'], 'compile_s': summary['compile_seconds'],
          'compilations': summary['compilations'],
          'compilations_from_cache': summary['compilations_from_cache'],
          'rounds_s': summary['seconds'], 'final_error': summary['final_error'],
          'final_test_loss': summary['final_test_loss'],
          'train_flops': summary['train_flops'], 'train_examples': summary['train_examples']}


def _failed(command: list[str], stderr: str) -> RuntimeError:
  return RuntimeError(f'{" ".join(command)} failed:\n{stderr[-3000:]}')


def rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: r[k] for k in ROW_FIELDS} for r in map(json.loads, f)]


def repeated_runs(config: str, tmp: str, overrides: tuple[str, ...] = ()) -> dict:
  """A run with empty caches (compilation, decoded data), the same run again, and one killed
  after arrival 2 and resumed; whether all three wrote identical rows."""
  cache = os.path.join(tmp, 'cache')
  out = {'config': config}
  for name in ('first', 'again'):
    out[name] = main_run(config, os.path.join(tmp, name), cache, overrides=overrides)
  resumed = os.path.join(tmp, 'resumed')
  main_run(config, resumed, cache, kill_after=2, overrides=overrides)
  out['resumed'] = main_run(config, resumed, cache, overrides=overrides)
  first = rows(os.path.join(tmp, 'first'))
  out['identical_rows'] = {name: rows(os.path.join(tmp, name)) == first
                           for name in ('again', 'resumed')}
  for measure in ('startup_wall', 'first_arrival'):
    out[f'{measure}_speedup_with_cache'] = (out['first'][f'{measure}_s']
                                            / out['again'][f'{measure}_s'])
  return out


def gpt2_small(cpu: bool):
  c = alma_config.load(os.path.join(ROOT, 'configs', 'lm.py:gpt2_small'))
  if cpu:  # a few steps of one sequence in float32: the shape, not the batch, at CPU speed
    c.train.batch_size = 1
    c.model.dtype = 'float32'
  return c


def lm_gpt2(cpu: bool, peak: float, profile=lambda name: '') -> dict:
  """GPT-2 small's step with the attention 'auto' picks; `profile(name)`: where to trace it."""
  c = gpt2_small(cpu)
  return {'auto': benchmark_lm.throughput(c, data.load(c.data), 2 if cpu else 60, peak,
                                          profile('lm_gpt2'))}


def nondeterministic(demo: str, tmp: str, profile: str = '',
                     lm: str = 'configs/lm.py:gpt2_small') -> dict:
  """The demo run and the `lm` config's step (benchmark_lm.py, 60 steps; with `profile`, 3
  more traced there) in fresh processes with config.backend.deterministic=False, and without the
  deterministic flags this process put into XLA_FLAGS."""
  env = dict(os.environ, XLA_FLAGS=backend.without_determinism(os.environ.get('XLA_FLAGS', '')))
  out = {'demo': main_run(demo, os.path.join(tmp, 'nondeterministic'),
                          os.path.join(tmp, 'demo', 'cache'),
                          overrides=('--config.backend.deterministic=False',), env=env)}
  path = os.path.join(tmp, 'lm_nondeterministic.json')
  command = [sys.executable, os.path.join(ROOT, 'experiments', 'benchmark_lm.py'),
             f'--config={lm}', '--steps=60', '--nondeterministic', f'--out={path}',
             f'--profile={profile}']
  process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
  if process.returncode:
    raise _failed(command, process.stderr)
  with open(path) as f:
    out['lm'] = json.load(f)
  return out


def torch_demo() -> dict:
  if importlib.util.find_spec('torch') is None:
    return {'skipped': 'torch is not importable here'}
  if jax.default_backend() not in ('cpu', 'gpu'):
    return {'skipped': f'PyTorch has no {jax.default_backend()} device here to compare on'}
  import benchmark_torch
  device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
  config = benchmark_torch.load_config('')
  result = benchmark_torch.bench_torch(config, benchmark_torch._index_batches, device)
  return {'device': device, **result}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='')
  parser.add_argument('--only', default=','.join(SECTIONS))
  parser.add_argument('--profile', default='', help='a folder: jax.profiler traces of 3 '
                      'GPT-2-small steps in its lm_gpt2 and lm_gpt2_nondeterministic')
  args = parser.parse_args()
  # As a run of the default config would: deterministic GPU kernels (set before the backend
  # starts), programs cached under the default compilation cache.
  backend.configure(alma_config.base().backend)
  # Sections run fresh processes on the same GPU: none may hold 75% of its memory (JAX's default
  # preallocation), or the next one cannot start cuBLAS or fit GPT-2.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  cpu = jax.default_backend() == 'cpu'
  out_path = args.out or os.path.join(ROOT, 'experiments', 'results',
                                      f'accelerator_{jax.default_backend()}.json')
  result = {**common.environment(), 'sections': {}}
  began = time.perf_counter()
  profile = lambda name: os.path.join(args.profile, name) if args.profile else ''

  def section(name, fn):
    if name not in args.only.split(','):
      return None
    print(f'== {name} ({time.perf_counter() - began:.0f} s so far)', flush=True)
    started = time.perf_counter()
    try:
      result['sections'][name] = fn()
    except Exception as error:  # a failed section is reported, the rest still runs
      result['sections'][name] = common.error(error)
    result.setdefault('section_seconds', {})[name] = time.perf_counter() - started
    result['total_seconds'] = time.perf_counter() - began
    common.write_result(result, out_path)
    return result['sections'][name]

  peak = section('peak', benchmark_lm.matmul_peak)
  if not peak or 'flops' not in peak:
    peak = benchmark_lm.matmul_peak()
  demo = os.path.join(ROOT, 'configs', 'fashion_mnist.py')
  with tempfile.TemporaryDirectory() as tmp:
    section('lm_gpt2', lambda: lm_gpt2(cpu, peak['flops'], profile))
    section('demo', lambda: repeated_runs(demo, os.path.join(tmp, 'demo')))
    section('torch', torch_demo)
    lm = os.path.join(ROOT, 'configs', 'lm.py' + (':tiny' if cpu else ''))
    section('lm_runs', lambda: repeated_runs(lm, os.path.join(tmp, 'lm')))
    if jax.default_backend() == 'gpu':
      section('nondeterministic', lambda: nondeterministic(
          demo, tmp, profile('lm_gpt2_nondeterministic')))
    # Last, so that a time limit cuts the figures already measured elsewhere, not the targets.
    section('steps', lambda: {name: benchmark_steps.examples_per_second(f, 5376, 3, 'auto')
                              for name, f in benchmark_steps.CONFIGS.items()})

    def lm_default():
      c = alma_config.load(os.path.join(ROOT, 'configs', 'lm.py'))
      return benchmark_lm.throughput(c, data.load(c.data), 200 if cpu else 2000, peak['flops'])
    section('lm_default', lm_default)

    def lm_gpt2_medium():
      if cpu:
        return {'skipped': 'accelerators only (benchmark_fsdp.py compiles it on CPU devices)'}
      c = alma_config.load(os.path.join(ROOT, 'configs', 'lm.py:gpt2_medium'))
      return benchmark_lm.throughput(c, data.load(c.data), 40, peak['flops'])
    section('lm_gpt2_medium', lm_gpt2_medium)


if __name__ == '__main__':
  main()
