"""What the benchmark scripts share: the language-model scripts' command line, a member's
epoch to time, the environment, and their JSON result."""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alma_jax import backend, config as alma_config, data  # noqa: E402


def lm_script(doc: str, out: str, **options: int | str):
  """Parsed `--config=path[:variant] --out=PATH --OPTION=VALUE...` (each option of its
  default's type), the config and its data set. `--nondeterministic` measures with
  config.backend.deterministic=False (GPUs: see backend)."""
  parser = argparse.ArgumentParser(description=doc.split('\n\n')[0])
  parser.add_argument('--config', default='configs/lm.py')
  parser.add_argument('--out', default=out)
  parser.add_argument('--nondeterministic', action='store_true')
  for name, default in options.items():
    parser.add_argument(f'--{name}', type=type(default), default=default)
  args = parser.parse_args()
  config = alma_config.load(args.config)
  if args.nondeterministic:
    config.backend.deterministic = False
  backend.configure(config.backend)  # as a run of the config would, before the backend starts
  return args, config, data.load(config.data)


def environment() -> dict:
  """Where a figure was measured: the device, the versions of what computed it (the jax
  plugins for GPUs and TPUs included), the code (its commit, and a digest of its sources, which
  names the code even where a copy carries stale git metadata) and the command."""
  import importlib.metadata
  import platform

  import subprocess

  import jax

  import alma_jax
  versions = {'alma_jax': alma_jax.__version__}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'grain',
                  'torch'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  for dist in importlib.metadata.distributions():  # jax-cuda13-plugin, libtpu, ...
    name = (dist.metadata['Name'] or '').lower()
    if name.startswith(('jax-cuda', 'jax_cuda', 'libtpu', 'jax-rocm')):
      versions[name] = dist.version
  try:  # the commit measured, '+' when the tree had changes (None: not a git checkout)
    commit = subprocess.run(['git', 'describe', '--always', '--dirty=+'], cwd=ROOT,
                            capture_output=True, text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):  # no git, or it hung
    commit = None
  return {'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
          'devices': jax.device_count(), 'cpu': _cpu_model(), 'cpu_count': os.cpu_count(),
          'python': platform.python_version(), 'versions': versions, 'commit': commit,
          'source_digest': source_digest(), 'command': [_script(), *sys.argv[1:]]}


def _script() -> str:
  return (os.path.relpath(sys.argv[0], ROOT) if sys.argv and os.path.isfile(sys.argv[0])
          else (sys.argv or [''])[0])


def source_digest(root: str = ROOT) -> str:
  """A digest of the code's Python sources (alma_jax/, configs/, experiments/): equal digests,
  equal code. For a commit: `git worktree add /tmp/c COMMIT`, then this over /tmp/c."""
  import hashlib
  digest = hashlib.sha256()
  for top in ('alma_jax', 'configs', 'experiments'):
    paths = sorted(os.path.relpath(os.path.join(d, name), root)
                   for d, _, names in os.walk(os.path.join(root, top))
                   for name in names if name.endswith('.py'))
    for path in paths:
      digest.update(path.encode() + b'\0')
      with open(os.path.join(root, path), 'rb') as f:
        digest.update(f.read() + b'\0')
  return digest.hexdigest()[:12]


def _cpu_model() -> str:
  import platform
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def first_call(fn, *args):
  """`fn(*args)` waited for, and what that first call cost: its seconds, the programs it
  compiled or loaded from the persistent compilation cache, and their seconds (so a warm-up's
  time says whether it compiled)."""
  import time

  import jax
  began = time.perf_counter()
  with backend.Compilations() as compiled:
    out = jax.block_until_ready(fn(*args))
  return out, {'seconds': time.perf_counter() - began, 'compilations': compiled.count,
               'from_cache': compiled.loaded, 'compile_seconds': compiled.seconds}


def member_epoch(learner, examples: int):
  """A fresh member of `learner` (variables, optimizer state with its round started) and
  `epoch(variables, opt_state, e, count=n)`: epoch e of that member over the first `examples`
  training examples (n of them, padded to a bucket; `count` fewer, with the same program)."""
  import jax
  import numpy as np

  from alma_jax import steps
  indices, n = steps.pad_indices(np.arange(examples)[None], learner.trainer.batch_size)
  weights = (np.arange(indices.shape[1]) < n).astype(np.float32)[None]
  variables = learner.new_members(jax.random.key(0), 1)
  opt_state = learner.start_round(learner.init_optimizer(variables), n)
  keys = jax.random.split(jax.random.key(1), 1)

  def epoch(variables, opt_state, e, count=n):
    return learner.trainer.train_epoch(variables, opt_state, learner.data.train_images,
                                       learner.data.train_labels, indices, weights, count, keys, e)

  return epoch, variables, opt_state, n


def error(error: Exception) -> dict:
  """What a failed measurement records (its traceback printed)."""
  import traceback
  traceback.print_exc()
  return {'error': f'{type(error).__name__}: {error}'[:2000]}


def write_result(result: dict, path: str, show: bool = True) -> None:
  """Writes `result` as JSON to `path` and (`show`) prints it."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  if show:
    print(json.dumps(result, indent=2))
