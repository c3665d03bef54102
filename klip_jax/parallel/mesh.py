"""The (data, fsdp, tensor) device mesh and the context that maps logical names onto it.

Meshes use Auto axis types so GSPMD propagates shardings from the logical constraints in the
model (explicit axis types would demand an out_sharding on every ambiguous op).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from klip_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fill the one -1 entry so the product is `num_devices`."""
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ConfigError(f"config.mesh.shape={tuple(shape)}: at most one axis may be -1.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f"config.mesh.shape={tuple(shape)} does not divide {num_devices} devices.")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ConfigError(f"config.mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices, "
                      f"{num_devices} are available; use -1 for one axis to fill the rest.")
  return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_shape(shape, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def logical_context(mesh: jax.sharding.Mesh, rules):
  """Inside: jax's current mesh is `mesh` and flax maps logical axis names with `rules`."""
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def shardings_of(tree):
  """The shardings of a pytree of jax.Arrays (e.g. restored params), for in_shardings."""
  return jax.tree.map(lambda x: x.sharding, tree)
