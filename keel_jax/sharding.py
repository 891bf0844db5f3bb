"""Meshes and logical-axis rules: the only place that knows about devices.

The model names every axis (`batch`, `embed`, `layers`, ...); `config.mesh.rules`
maps those names onto mesh axes. The same code runs on one CPU, fake CPU
devices and a TPU pod.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolve one -1 in config.mesh.shape to the remaining devices; check the product."""
  shape = list(mesh_cfg.shape)
  if len(shape) != len(mesh_cfg.axes):
    raise ValueError(f"config.mesh.shape={tuple(shape)} needs one size per axis {mesh_cfg.axes}")
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape={tuple(shape)} may contain at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or num_devices % known:
      raise ValueError(
        f"config.mesh.shape={tuple(shape)} cannot cover {num_devices} devices; "
        f"the fixed sizes must divide the device count"
      )
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
      f"config.mesh.shape={tuple(shape)} has {math.prod(shape)} devices but "
      f"{num_devices} are available; use -1 for one axis or match the device count"
    )
  return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A named mesh over `devices` (default: all), laid out for the interconnect."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # fake CPU devices and odd topologies: plain order is fine
    grid = np.asarray(devices).reshape(shape)
  # Built directly: jax.make_mesh defaults to Explicit axes, which linen constraints reject.
  return Mesh(grid, tuple(mesh_cfg.axes))


def rules(mesh_cfg) -> tuple[tuple[str, object], ...]:
  return tuple(
    (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in mesh_cfg.rules
  )


def logical_to_sharding(boxed_tree, mesh: Mesh, mesh_rules):
  """NamedShardings for a tree of (abstract) values boxed with logical axis names."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, mesh_rules)


def batch_sharding(mesh: Mesh, mesh_rules) -> NamedSharding:
  """Sharding of a [batch, seq] token array."""
  spec = nn.logical_to_mesh_axes(("batch", "seq"), mesh_rules)
  return NamedSharding(mesh, PartitionSpec(*spec))


def data_parallel_size(mesh: Mesh, mesh_rules) -> int:
  """How many ways the batch axis is split (the global batch must divide by it)."""
  spec = nn.logical_to_mesh_axes(("batch",), mesh_rules)[0]
  axes = (spec,) if isinstance(spec, str) else (spec or ())
  return math.prod(mesh.shape[a] for a in axes)
