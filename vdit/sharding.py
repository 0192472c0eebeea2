"""Device mesh from the config, logical-axis rules, and host-local → global batches.

Sharding is data: the mesh sizes and the logical→mesh rules come from the config
(`config.mesh`, `config.sharding_rules`); modules only name logical axes (`vdit.axes`).
"""

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit import axes, batch_spec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# Logical axes of each batch key (`vdit.batch_spec`: the packed and the dense batches).
BATCH_AXES: dict[str, tuple[str | None, ...]] = {
  key: field.axes for key, field in batch_spec.FIELDS.items()
}

# Default logical→mesh rules: batch rows over data×fsdp, weights' embed over fsdp (ZeRO-3
# style), heads/mlp/vocab over tensor, the packed length over sequence.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  (axes.BATCH, ("data", "fsdp")),
  (axes.LENGTH, "sequence"),
  (axes.EMBED, "fsdp"),
  (axes.MLP, "tensor"),
  (axes.HEADS, "tensor"),
  (axes.VOCAB, "tensor"),
  (axes.KV, None),
  (axes.TEXT_LENGTH, None),
  (axes.PATCH, None),
  (axes.LAYERS, None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `{data: -1, fsdp: 2, ...}` to concrete sizes whose product is `num_devices`."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(mesh_config)} has more than one axis set to -1")
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"mesh axis {axis}={size} must be a positive size or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"mesh {dict(mesh_config)}: {num_devices} devices are not divisible by the fixed axes' "
        f"product {known}"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
      f"but {num_devices} are available"
    )
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'sequence', 'tensor') mesh from the config.

  `devices` defaults to all devices; pass a subset, or the compile-only devices of a TPU
  topology (`vdit.tools.aot`). On TPU the placement follows the physical torus (each mesh axis
  a ring of chips where possible; an axis may span part of a physical axis); on CPU it is the
  device order, which keeps each process's devices contiguous.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except NotImplementedError:  # an axis size that is no product of physical axes
    device_array = mesh_utils.create_device_mesh(
      shape, devices=devices, allow_split_physical_axes=True
    )
  except (ValueError, AssertionError):  # a subset of the devices: plain order
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Normalizes config rules (lists from JSON/ConfigDict) to flax's tuple-of-pairs form."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for name, mesh_axes in rules:
    out.append((name, tuple(mesh_axes) if isinstance(mesh_axes, list | tuple) else mesh_axes))
  return tuple(out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Mesh + logical rules in context, needed when tracing modules with logical constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_sharding(mesh: Mesh, rules, logical_axes: Sequence[str | None]) -> NamedSharding:
  """NamedSharding for one array with the given logical axes."""
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  return NamedSharding(mesh, spec)


def batch_shardings(mesh: Mesh, rules, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
  """Shardings of the packed-batch keys present in `batch`."""
  out = {}
  for key in batch:
    if key not in BATCH_AXES:
      raise KeyError(f"batch key {key!r} has no logical axes; known keys: {sorted(BATCH_AXES)}")
    out[key] = logical_sharding(mesh, rules, BATCH_AXES[key])
  return out


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Assembles global `jax.Array`s from each host's local slice of the batch (rows)."""
  shardings = batch_shardings(mesh, rules, batch)
  return {
    k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()
  }


def tree_shardings(mesh: Mesh, rules, abstract_boxed_tree: Any) -> Any:
  """Shardings for a tree whose leaves carry logical `nn.Partitioned` metadata.

  Leaves without metadata (step counters, rng keys, scalar optimizer state) are replicated. A
  box around optax's `MaskedNode` (the state a partitioned optimizer such as muon keeps for the
  parameters another part updates) holds no array and stays a `MaskedNode`.
  """
  tree = jax.tree_util.tree_map(
    lambda x: (
      x.value if isinstance(x, nn.Partitioned) and isinstance(x.value, optax.MaskedNode) else x
    ),
    abstract_boxed_tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a global array on this host: gathered from the other processes only if
  it spans them (outputs such as generated videos; never a model's params)."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
