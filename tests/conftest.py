"""Shared fixtures: a small synthetic idx data set and a tiny config over it."""
import gzip
import os
import sys

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
