"""Reader for MNIST-format (idx) files, plain or gzipped: MNIST, Fashion-MNIST, KMNIST, ..."""
from __future__ import annotations

import gzip
import hashlib
import os
import uuid
import zlib

import numpy as np

from alma_jax.data import DataNotFoundError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_HINT = {
    'fashion-mnist': 'apt-get install -y dataset-fashion-mnist',
}


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser('~'), '.cache', 'alma_jax', 'idx')


def read(path: str, cache_dir: str | None = None) -> np.ndarray:
  """Reads one idx file into an array of its stored shape. With `cache_dir`, a gzipped file is
  decoded once into a .npy there, named by its path, size and modification time, which later
  reads load instead (decompressing Fashion-MNIST took 0.26 s of every run's start-up)."""
  if cache_dir is None or not path.endswith('.gz'):
    return _decode(path)
  status = os.stat(path)
  identity = f'{os.path.abspath(path)}:{status.st_size}:{status.st_mtime_ns}'
  cached = os.path.join(cache_dir, f'{os.path.basename(path)[:-3]}-'
                        f'{hashlib.sha256(identity.encode()).hexdigest()[:16]}.npy')
  try:
    return np.load(cached)
  except (OSError, ValueError, EOFError):  # not cached yet, or not a whole array
    array = _decode(path)
  temporary = f'{cached}.tmp-{uuid.uuid4().hex[:8]}.npy'
  try:
    os.makedirs(cache_dir, exist_ok=True)
    with open(temporary, 'wb') as f:
      np.save(f, array)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, cached)
  except OSError:  # a cache that cannot be written costs the next run the decoding, no more
    if os.path.exists(temporary):
      os.remove(temporary)
  return array


def _decode(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as error:
    raise ValueError(f'{path}: unreadable ({error})') from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
    raise ValueError(f'{path}: not an idx file (bad magic number)')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
  dtype = np.dtype(_DTYPES[data[2]])
  offset = 4 + 4 * ndim
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - offset != expected:
    raise ValueError(f'{path}: holds {len(data) - offset} bytes of data, header says {expected}')
  return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder('='))


def _find(directory: str, stem: str) -> str:
  for name in (stem + '.gz', stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  hint = _HINT.get(os.path.basename(os.path.normpath(directory)))
  raise DataNotFoundError(
      f'idx data set not found: no {stem}[.gz] in {directory!r}. '
      + (f'Install it with: {hint}' if hint else 'Set config.data.path to a folder of idx files.'))


def load(directory: str, cache_dir: str | None = None
         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train': (images (N, H, W, 1) uint8, labels (N,)), 'test': (...)} from a folder (gzipped
  files decoded once into `cache_dir`: see `read`)."""
  out = {}
  for split, (images_stem, labels_stem) in _FILES.items():
    images = read(_find(directory, images_stem), cache_dir)
    labels = read(_find(directory, labels_stem), cache_dir)
    if len(images) != len(labels):
      raise ValueError(f'{directory}: {split} has {len(images)} images but {len(labels)} labels')
    out[split] = (images[..., None] if images.ndim == 3 else images, labels)
  return out
