"""The device mesh and the shardings the steps use: batches split over `data`, the rest replicated."""
from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh(data: int = 0) -> jax.sharding.Mesh:
  """A 1-D mesh over `data` devices (0: all devices present)."""
  n = data or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f'config.mesh.data={data}: only {jax.device_count()} devices are present')
  return jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  """Leading (example) axis split over the `data` axis."""
  return NamedSharding(mesh, P('data'))
