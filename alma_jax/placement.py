"""Where the data set lives during a run: on the devices, or on the hosts and streamed.

'device': each array is put on every device once (replicated) and the compiled loops gather
their batches by index. The fastest path, for data sets that fit beside the model.
'host': the arrays stay in host memory (memory-mapped files for corpora larger than memory). A
step's global batch is gathered on the host by a Grain loader a few batches ahead, and every
process puts on its devices only the rows of its own slice of the batch. The examples, their
order and the per-step keys are those of the device path (the stream's indices stay global), so
both paths compute the same run.
'auto' (`config.data.placement`): the device path when the data set's arrays fit in
`config.data.device_memory` bytes of one device (0: half the memory of the device), else the
host path.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np

from alma_jax import sharding

PLACEMENTS = ('auto', 'device', 'host')


@dataclasses.dataclass(frozen=True)
class DataArrays:
  """The data set's arrays as a run reads them: jax Arrays on the devices, or numpy arrays
  (possibly memory-mapped) on the hosts."""
  train_images: jax.Array | np.ndarray
  train_labels: jax.Array | np.ndarray
  test_images: jax.Array | np.ndarray
  test_labels: jax.Array | np.ndarray

  @property
  def on_host(self) -> bool:
    return on_host(self.train_images)

  def batch(self, indices: np.ndarray, mesh) -> tuple[jax.Array, jax.Array]:
    """The training examples at `indices` (images, labels) on the mesh, split over the `data`
    axis where their count divides it (from the hosts, each process reads its rows)."""
    where = sharding.examples_sharded(mesh, len(indices))
    if self.on_host:
      return global_examples(self.train_images, self.train_labels, indices, where)
    return _gather(self.train_images, self.train_labels, indices, where)


def on_host(array) -> bool:
  return isinstance(array, np.ndarray)


@functools.partial(jax.jit, static_argnums=3)
def _gather(images, labels, indices, where):
  return jax.lax.with_sharding_constraint((images[indices], labels[indices]), where)


def data_bytes(dataset) -> int:
  return sum(a.nbytes for a in (dataset.train_images, dataset.train_labels,
                                dataset.test_images, dataset.test_labels))


def device_memory() -> int:
  """Bytes of memory of one local device: what the backend reports, or for devices that share
  the host's memory (CPU), the host's memory split among them."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // jax.local_device_count()


def choose(config, dataset) -> str:
  """'device' or 'host' for `config` (the data section) and the loaded `dataset`; under 'auto',
  'host' on every process if the data does not fit the devices of any."""
  if config.placement != 'auto':
    return config.placement
  budget = config.device_memory or device_memory() // 2
  return 'host' if sharding.worst(int(data_bytes(dataset) > budget)) else 'device'


def place(dataset, mesh, where: str) -> DataArrays:
  """The data set's arrays where the run reads them: 'device' or 'host' (see `choose`)."""
  if where == 'host':
    return DataArrays(dataset.train_images, dataset.train_labels, dataset.test_images,
                      dataset.test_labels)
  return device_data(dataset, mesh)


def device_data(dataset, mesh) -> DataArrays:
  """The data set's arrays on the mesh, replicated."""
  put = lambda x: sharding.global_array(np.asarray(x), sharding.replicated(mesh))
  return DataArrays(put(dataset.train_images), put(dataset.train_labels),
                    put(dataset.test_images), put(dataset.test_labels))


def global_batch(array: np.ndarray, indices: np.ndarray, where) -> jax.Array:
  """The rows `indices` (any shape) of the host `array` as one array over the mesh, laid out by
  `where`: each process reads and transfers only the rows of its own devices' shards."""
  k = indices.ndim

  def rows(index):
    return np.asarray(array[np.asarray(indices[index[:k]])][(slice(None),) * k + index[k:]])

  return jax.make_array_from_callback(indices.shape + array.shape[1:], where, rows)


def global_examples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, where):
  """(images, labels) at `indices`, each a `global_batch`."""
  return global_batch(images, indices, where), global_batch(labels, indices, where)


def prefetched(make, count: int, ahead: int):
  """`make(0), ..., make(count - 1)` in order, computed by background threads (Grain) up to
  `ahead` items before they are asked for (`ahead` 0: each when asked for)."""
  if ahead == 0 or count <= 1:
    return map(make, range(count))
  import grain  # only runs that stream pay for its import
  options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=ahead)
  return iter(grain.MapDataset.range(count).map(make).to_iter_dataset(options))
