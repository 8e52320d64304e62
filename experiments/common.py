"""What the language-model scripts share: their command line and their JSON result."""
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
  """Where a figure was measured: the device and the versions of what computed it."""
  import importlib.metadata
  import platform

  import subprocess

  import jax

  import alma_jax
  versions = {'alma_jax': alma_jax.__version__}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'torch'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:  # the commit measured, '+' when the tree had changes (None: not a git checkout)
    commit = subprocess.run(['git', 'describe', '--always', '--dirty=+'], cwd=ROOT,
                            capture_output=True, text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):  # no git, or it hung
    commit = None
  return {'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
          'devices': jax.device_count(), 'cpu_count': os.cpu_count(),
          'python': platform.python_version(), 'versions': versions, 'commit': commit}


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
