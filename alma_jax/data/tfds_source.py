"""TFDS catalog data sets (mnist, cifar10, ..., lm1b) read through `tfds.data_source`.

Reading a prepared data set needs no TensorFlow. Preparing one (the first download) does, and
needs internet: without them the user gets a message naming what to install or run.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from alma_jax.data import DataNotFoundError


def prepare_command(name: str) -> str:
  """The command that prepares `name` once, in the random-access format this module reads
  (`tfds build` writes tfrecord files by default, which `tfds.data_source` cannot read)."""
  return f'tfds build {name} --data_dir=DIR --file_format=array_record'


def _split(name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as not_prepared:  # TFDS raises several types for "not prepared here".
    if (isinstance(not_prepared, NotImplementedError)
        and tfds.builder(name, data_dir=data_dir).is_prepared()):  # in a sequential format
      raise DataNotFoundError(
          f'TFDS data set {name!r} ({split}) is prepared in '
          f'{data_dir or "the default TFDS data_dir"} in a format that cannot be read at random '
          f'(tfrecord, the default of `tfds build`): prepare it into another folder with '
          f'`{prepare_command(name)}` and set --config.data.tfds_data_dir=DIR') from not_prepared
    if importlib.util.find_spec('tensorflow') is None:
      raise DataNotFoundError(
          f'TFDS data set {name!r} ({split}) is not prepared in '
          f'{data_dir or "the default TFDS data_dir"}, and preparing it needs TensorFlow and '
          f'internet. Install the optional extra (pip install tensorflow) and run again, or use '
          f'an offline config such as configs/fashion_mnist.py.') from not_prepared
    import jax
    if jax.process_count() > 1:  # N processes would download and write it all at once
      raise DataNotFoundError(
          f'TFDS data set {name!r} ({split}) is not prepared in '
          f'{data_dir or "the default TFDS data_dir"}: prepare it once before a multi-process '
          f'run (`{prepare_command(name)}`, then --config.data.tfds_data_dir=DIR, a folder '
          f'every host reads)') from not_prepared
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=True)
  except Exception as failed:
    raise DataNotFoundError(
        f'TFDS data set {name!r} could not be downloaded and prepared ({failed}). It needs '
        f'internet the first time; or use an offline config such as configs/fashion_mnist.py.'
    ) from failed


TEXT_FEATURE = 'text'  # what TFDS text data sets (lm1b) name a record's text


def text_splits(name: str, data_dir: str | None = None) -> tuple[dict, dict]:
  """({'train', 'test': (record count, a function yielding the records' text as bytes, each
  ended by a newline)}, what identifies the prepared data set) of a TFDS text data set (lm1b:
  one sentence a record), read one record at a time."""
  import tensorflow_datasets as tfds
  splits = {}
  for split in ('train', 'test'):
    source = _split(name, split, data_dir)
    splits[split] = (len(source), lambda source=source: (
        _as_bytes(source[i][TEXT_FEATURE]) + b'\n' for i in range(len(source))))
  builder = tfds.builder(name, data_dir=data_dir)
  identity = {'source': 'tfds', 'name': name, 'feature': TEXT_FEATURE,
              'version': str(builder.info.version), 'data_dir': str(builder.data_dir),
              'records': {split: count for split, (count, _) in splits.items()}}
  return splits, identity


def _as_bytes(text) -> bytes:
  if isinstance(text, np.ndarray):
    text = text.item()
  return text if isinstance(text, bytes) else str(text).encode('utf-8')


def load(name: str, data_dir: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train': (images uint8 (N, H, W, C), labels (N,)), 'test': (...)} of a TFDS image set."""
  out = {}
  for split in ('train', 'test'):
    source = _split(name, split, data_dir)
    records = [source[i] for i in range(len(source))]
    images = np.stack([r['image'] for r in records]).astype(np.uint8)
    labels = np.asarray([r['label'] for r in records], np.int32)
    out[split] = (images, labels)
  return out
