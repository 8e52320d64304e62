"""Data sources -> in-memory arrays.

Every source returns a :class:`Dataset` of raw examples (uint8 images, int labels). Scaling and
normalization happen on the device inside the compiled steps (:meth:`Dataset.preprocess`).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


class DataNotFoundError(FileNotFoundError):
  """A data set is missing; the message says what provides it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train_images: np.ndarray  # (N, H, W, C) uint8
  train_labels: np.ndarray  # (N,) int32
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def image_shape(self) -> tuple[int, ...]:
    return self.train_images.shape[1:]

  def preprocess(self, images):
    """uint8 images -> float32, scaled to [0, 1] and normalized per channel."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)


def _subset(images, labels, limit):
  if limit and limit < len(labels):
    return images[:limit], labels[:limit]
  return images, labels


def load(config) -> Dataset:
  """Loads the data set that `config` (the `data` section) names."""
  if config.source == 'idx':
    from alma_jax.data import idx
    arrays = idx.load(config.path)
  elif config.source == 'tfds':
    from alma_jax.data import tfds_source
    arrays = tfds_source.load(config.name, config.tfds_data_dir or None)
  else:
    raise ValueError(f"config.data.source={config.source!r}: must be 'idx' or 'tfds'")
  train = _subset(*arrays['train'], config.max_train_examples)
  test = _subset(*arrays['test'], config.max_test_examples)
  return Dataset(
      name=config.name,
      train_images=train[0], train_labels=train[1].astype(np.int32),
      test_images=test[0], test_labels=test[1].astype(np.int32),
      num_classes=config.num_classes,
      mean=tuple(config.mean), std=tuple(config.std))
