"""The device mesh and the shardings the steps use.

The mesh has two axes: `member` (devices that hold different ensemble members) and `data`
(devices that split each batch). Batches are split over `data`; a stack of members is split over
`member` (its leading axis), and with `config.mesh.shard_params` its parameters and optimizer
states over `data` too (FSDP); the data set and everything else is replicated. With several
processes (hosts), the mesh spans the devices of all of them.

Models name the axes of their activations with Flax's logical names (`nn.with_logical_constraint`;
`BATCH` for the example axis); within `activations(mesh)` (the steps trace there) the batch axis
is split over `data`, so that XLA gathers sharded parameters to the activations rather than
splitting activations the way the parameters are split.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

MEMBER, DATA = 'member', 'data'
BATCH = 'batch'  # the logical name of an activation's example axis


@contextlib.contextmanager
def activations(mesh):
  """Within it, programs traced map the logical `BATCH` axis of activations onto `data`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(((BATCH, DATA),)):
    yield


def make_mesh(data: int = 0, member: int = 1) -> jax.sharding.Mesh:
  """A (member, data) mesh; `data=0` uses every device the member axis leaves."""
  total = jax.device_count()
  if member < 1 or total % member:
    raise ValueError(f'config.mesh.member={member}: must divide the {total} devices present')
  data = data or total // member
  if member * data > total:
    raise ValueError(f'config.mesh.data={data} x config.mesh.member={member}: only {total} '
                     f'devices are present')
  if member * data < total and jax.process_count() > 1:  # (processes without a device in it)
    raise ValueError(f'config.mesh.data={data} x config.mesh.member={member}: a run of '
                     f'{jax.process_count()} processes uses all their {total} devices')
  return jax.make_mesh((member, data), (MEMBER, DATA), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:member * data])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  """Leading (example) axis split over the `data` axis."""
  return NamedSharding(mesh, P(DATA))


def examples_sharded(mesh, count: int) -> NamedSharding:
  """`count` examples (leading axis) split over the `data` axis where it divides them, else
  whole on every device."""
  return batch_sharded(mesh) if count % mesh.shape[DATA] == 0 else replicated(mesh)


def members_batch_sharded(mesh, members: int, steps: bool = False) -> NamedSharding:
  """Batches of a stack of members (member, example, ...), or with `steps` several steps'
  batches (member, step, example, ...): members split over `member` where their count divides
  it, examples over `data`."""
  member = MEMBER if members % mesh.shape[MEMBER] == 0 else None
  return NamedSharding(mesh, P(member, None, DATA) if steps else P(member, DATA))


def microbatch_sharded(mesh) -> NamedSharding:
  """A batch cut into microbatches (microbatch, example, ...): examples split over `data`."""
  return NamedSharding(mesh, P(None, DATA))


def stacked(mesh, tree, shard_params: bool = False):
  """Shardings (a tree like `tree`, whose leaves have a leading member axis) of a stack of
  members: split over the `member` axis where the member count divides it, else replicated.
  With `shard_params` (FSDP), each leaf's largest other dimension that the `data` axis divides
  is split over `data` as well: every device holds 1/data of the members' parameters and
  optimizer states, and XLA gathers them where a step needs them whole."""
  return jax.tree.map(lambda x: stacked_leaf(mesh, np.shape(x), shard_params), tree)


def stacked_leaf(mesh, shape: tuple[int, ...], shard_params: bool = False) -> NamedSharding:
  """The sharding `stacked` gives one leaf of `shape`."""
  if not shape:
    return NamedSharding(mesh, P())
  spec = [MEMBER if shape[0] % mesh.shape[MEMBER] == 0 else None]
  spec += [None] * (len(shape) - 1)
  data_axis = _data_axis(shape, mesh.shape[DATA]) if shard_params else None
  if data_axis is not None:
    spec[data_axis] = DATA
  return NamedSharding(mesh, P(*spec))


def _data_axis(shape: tuple[int, ...], data: int) -> int | None:
  """The dimension of a stacked leaf that FSDP splits over `data` devices: the largest one
  after the member axis that `data` divides; None: the leaf stays whole on every device."""
  fits = [d for d in range(1, len(shape)) if data > 1 and shape[d] % data == 0]
  return max(fits, key=lambda d: (shape[d], d)) if fits else None


def split_fraction(tree, data: int) -> float:
  """The share of the elements of a stack of members (`tree`, as `stacked` takes it) that
  `stacked(..., shard_params=True)` splits over `data` devices: a leaf none of whose dimensions
  `data` divides (a grown layer of width 33, say) stays whole on every device."""
  sizes = [(int(np.prod(np.shape(x))), _data_axis(np.shape(x), data) is not None)
           for x in jax.tree.leaves(tree)]
  total = sum(size for size, _ in sizes)
  return sum(size for size, split in sizes if split) / total if total else 0.0


def global_array(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) as one array over the mesh's devices."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def checkpointable(tree):
  """`tree` with arrays made outside the mesh (eager, on one device) moved to the host: with
  several processes Orbax saves only arrays that span the mesh, or host arrays."""
  def convert(x):
    if isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.SingleDeviceSharding):
      return np.asarray(x)
    return x
  return jax.tree.map(convert, tree)


def local_copy(x: jax.Array) -> np.ndarray:
  """A replicated array as a host array (each process reads its own copy)."""
  return np.asarray(x.addressable_data(0))


def to_host(x) -> np.ndarray:
  """A device array as a host array on every process (gathered across processes if needed)."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def is_main_process() -> bool:
  """Process 0 writes metrics, summaries and logs; every process writes its checkpoint shards."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def worst(value: int) -> int:
  """The largest of `value` over all processes (each learns the same answer)."""
  if jax.process_count() == 1:
    return value
  seen = multihost_utils.process_allgather(np.array([value], np.int32))
  return int(np.max(np.asarray(seen)))


class FailedElsewhere(RuntimeError):
  """What another process raised stopped this one too (that process says what it was)."""


def on_every_process(what: str, fn):
  """`fn()`, run by every process; where it raised on any, raises on all (its own error
  where it raised, elsewhere FailedElsewhere naming `what`), so that no process waits at a
  collective for one that has stopped."""
  try:
    result, failed = fn(), None
  except Exception as error:  # re-raised below, once every process knows
    result, failed = None, error
  if worst(int(failed is not None)):
    if failed is not None:
      raise failed
    raise FailedElsewhere(f'{what} failed on another process (its output says why)')
  return result


def check_hosts_agree(name: str, fingerprint: int,
                      remedy: str = 'every host must run the same code, config and data'
                      ) -> None:
  """Raises on every process unless all processes computed the same `fingerprint`."""
  if jax.process_count() == 1:
    return
  seen = np.asarray(multihost_utils.process_allgather(np.array([fingerprint], np.int64)))
  seen = seen.reshape(-1)
  if np.any(seen != seen[0]):
    raise RuntimeError(f'the {jax.process_count()} processes disagree on {name} '
                       f'(fingerprints by process: {seen.tolist()}): {remedy}')
