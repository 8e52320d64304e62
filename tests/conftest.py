"""Shared fixtures: a small synthetic idx data set and a tiny config over it."""
import gzip
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The tests' programs compile with LLVM's optimizations off (XLA:CPU's backend): they run for
# milliseconds, and compile in about a third less time. Set before JAX starts its backend, and
# passed to the tests' subprocesses (`devices_env`); both sides of every comparison a test
# makes are compiled alike. Runs of the package itself keep XLA's defaults.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def devices_env(count: int) -> dict:
  """The environment of a test's subprocess that has `count` CPU devices."""
  return dict(os.environ, XLA_FLAGS=f'{TEST_XLA_FLAGS} '
                                    f'--xla_force_host_platform_device_count={count}')

from alma_jax import config as alma_config  # noqa: E402


def kill_during_round(command: list[str], arrival: int, timeout: float = 240) -> None:
  """Runs `command` (a `python -m alma_jax.main` call) and SIGKILLs it while the round of
  `arrival` trains: at that round's first epoch line, which follows the row (or the resume)
  of the arrival before."""
  process = subprocess.Popen(command + ['--config.log.epochs=True'], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  watchdog = threading.Timer(timeout, process.kill)
  watchdog.start()
  done = 0
  for line in process.stdout:
    fields = line.split()
    resumed = re.match(r'Resuming .* after arrival (\d+) ', line)
    if fields and fields[0].isdigit():
      done = int(fields[0])
    elif resumed:
      done = int(resumed[1])
    elif fields[:1] == ['epoch'] and done == arrival - 1:
      process.send_signal(signal.SIGKILL)
      break
  process.wait()
  watchdog.cancel()


def checkpoint_data_files(checkpoint_dir) -> list[str]:
  """The files holding a checkpoint's array data (Orbax OCDBT), largest first."""
  found = [os.path.join(root, name) for root, _, names in os.walk(checkpoint_dir)
           for name in names if os.sep + 'd' + os.sep in os.path.join(root, name)]
  return sorted(found, key=os.path.getsize, reverse=True)


def flip_a_bit(path) -> None:
  """Flips one bit in the middle of the file at `path`."""
  with open(path, 'r+b') as f:
    content = bytearray(f.read())
    content[len(content) // 2] ^= 0x10
    f.seek(0)
    f.write(content)


def write_idx(path: str, array: np.ndarray) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dataset(directory: str, n_train=1200, n_test=400, side=12, seed=0) -> str:
  """Ten classes of noisy prototype images: learnable, but not in one epoch."""
  rng = np.random.default_rng(seed)
  prototypes = rng.integers(0, 256, (10, side, side))
  os.makedirs(directory, exist_ok=True)
  for split, n in (('train', n_train), ('t10k', n_test)):
    labels = rng.integers(0, 10, n)
    noise = rng.normal(0, 90, (n, side, side))
    images = np.clip(0.5 * prototypes[labels] + noise + 64, 0, 255)
    write_idx(os.path.join(directory, f'{split}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(directory, f'{split}-labels-idx1-ubyte.gz'), labels)
  return directory


@pytest.fixture(scope='session')
def idx_dir(tmp_path_factory):
  return make_idx_dataset(str(tmp_path_factory.mktemp('synthetic_idx')))


def tiny_config(path: str):
  """A seconds-long protocol over the synthetic data set."""
  c = alma_config.base()
  c.data.update(source='idx', name='synthetic', path=path, mean=(0.5,), std=(0.3,))
  c.stream.num_megabatches = 5
  c.model.hidden = 16
  c.train.update(max_epochs=4, patience=2, eval_batch_size=256)
  c.log.tensorboard = False
  return c


@pytest.fixture
def config(idx_dir):
  return tiny_config(idx_dir)
