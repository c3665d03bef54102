"""The (data, fsdp, tensor) device mesh and the context that maps logical names onto it.

On a multi-slice TPU job the mesh is hybrid: config.mesh.shape lays out each slice (ICI) and
config.mesh.dcn_shape the slices (DCN), as MaxText's ici_*/dcn_* parallelism settings do.

Meshes use Auto axis types so GSPMD propagates shardings from the logical constraints in the
model (explicit axis types would demand an out_sharding on every ambiguous op).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils

from klip_jax.errors import ConfigError

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_shape(shape: Sequence[int], available: int, field: str = "shape",
                  unit: str = "devices") -> tuple[int, ...]:
  """Fill the one -1 entry of config.mesh.`field` so the product is `available` `unit`."""
  shape = list(shape)
  if not all(isinstance(n, (int, np.integer)) and (n >= 1 or n == -1) for n in shape):
    raise ConfigError(f"config.mesh.{field}={tuple(shape)}: every axis needs a whole number of {unit} >= 1, "
                      "or -1 for the one that fills the rest.")
  if shape.count(-1) > 1:
    raise ConfigError(f"config.mesh.{field}={tuple(shape)}: at most one axis may be -1.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if available % known:
      raise ConfigError(f"config.mesh.{field}={tuple(shape)} does not divide {available} {unit}.")
    shape[shape.index(-1)] = available // known
  if int(np.prod(shape)) != available:
    raise ConfigError(f"config.mesh.{field}={tuple(shape)} needs {int(np.prod(shape))} {unit}, "
                      f"{available} are available; use -1 for one axis to fill the rest.")
  return tuple(shape)


def devices_per_slice(devices: Sequence[jax.Device]) -> dict[int, int]:
  """slice index -> device count. Devices of a multi-slice TPU job carry `slice_index`; CPU,
  GPU and single-slice devices are all slice 0."""
  return dict(collections.Counter(getattr(d, "slice_index", 0) for d in devices))


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None,
              dcn_shape: Sequence[int] = (-1, 1, 1)) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all of them).

  `shape` lays out the devices of one slice, linked by fast ICI; `dcn_shape` says how many
  slices, linked by the much slower data-centre network, each axis spans, so axis i has
  shape[i] * dcn_shape[i] devices. Put the slices on `data` (e.g. (2, 1, 1)): its once-a-step
  gradient reduction is the one collective that tolerates DCN bandwidth; FSDP's gathers and
  tensor parallelism stay inside a slice. The default (-1, 1, 1) does that over however many
  slices there are; on one slice it is (1, 1, 1): jax.make_mesh's mesh over all devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  per_slice = devices_per_slice(devices)
  slices = len(per_slice)
  dcn_shape = resolve_shape(dcn_shape, slices, "dcn_shape", "slices")
  auto = (jax.sharding.AxisType.Auto,) * 3
  if slices == 1:
    return jax.make_mesh(resolve_shape(shape, len(devices)), AXES, axis_types=auto, devices=devices)
  if len(set(per_slice.values())) > 1:
    raise ConfigError(f"the slices hold different numbers of devices (slice: devices {per_slice}); "
                      "every slice of a multi-slice job must be the same TPU type and topology.")
  ici_shape = resolve_shape(shape, len(devices) // slices, "shape", "devices per slice")
  grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  return jax.sharding.Mesh(grid, AXES, axis_types=auto)


def from_config(mesh_config) -> jax.sharding.Mesh:
  """A run's mesh: config.mesh.shape within a slice, config.mesh.dcn_shape across slices."""
  return make_mesh(mesh_config.shape, dcn_shape=mesh_config.dcn_shape)


@contextlib.contextmanager
def logical_context(mesh: jax.sharding.Mesh, rules):
  """Inside: jax's current mesh is `mesh` and flax maps logical axis names with `rules`."""
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def check_batch(batch_size: int, shape: Sequence[int], setting: str, unit: str = "devices") -> None:
  """Refuse a global batch that a (data, fsdp, tensor) mesh of `shape` cannot split over its batch
  axes, naming the `setting`, before any work (the first global batch would fail with an
  IndivisibleError after the whole setup, or a TPU compile after the earlier slices' compiles)."""
  shards = shape[0] * shape[1]
  if batch_size % shards:
    raise ConfigError(f"{setting}={batch_size} does not split over the mesh's data x fsdp = {shards} {unit}; "
                      f"use a multiple of {shards}.")


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def shardings_of(tree):
  """The shardings of a pytree of jax.Arrays (e.g. restored params), for in_shardings."""
  return jax.tree.map(lambda x: x.sharding, tree)


def divisible(shardings, shapes):
  """`shardings` (NamedShardings) with every mesh axis dropped from a dimension it does not divide,
  that dimension then replicated over it (with a warning): the rules shard by name, and a size
  the user does not pick exactly (the tokenizer's vocabulary, 999 pieces over tensor=2) would
  otherwise stop the run at initialisation with an IndivisibleError. `shapes`: the arrays' (or
  ShapeDtypeStructs') tree of the same structure."""
  def fit(sharding, leaf):
    spec = list(sharding.spec) + [None] * (len(leaf.shape) - len(sharding.spec))
    for dim, (size, axes) in enumerate(zip(leaf.shape, spec)):
      names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
      shards = math.prod(sharding.mesh.shape[name] for name in names)
      if size % shards:
        log.warning("a %s array's dimension %d (%d) does not split over mesh axes %s (%d devices): replicated "
                    "over them instead", tuple(leaf.shape), dim, size, names, shards)
        spec[dim] = None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return jax.tree.map(fit, shardings, shapes)
