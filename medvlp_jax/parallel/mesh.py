"""Device mesh construction and the batch layout over it.

The mesh always has the axes ('data', 'fsdp', 'tensor'). The batch is split over data x fsdp;
parameters over fsdp (and tensor where the logical-axis rules say so, see `sharding.py`).
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Named sharding strategies (config `mesh.strategy`): axis sizes, -1 = all remaining devices.
STRATEGIES = {
    "dp": {"data": -1, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},
    "fsdp_tp": {"data": 1, "fsdp": -1, "tensor": 2},
}


class MeshError(ValueError):
    """The mesh config does not fit the devices or the batch; the message has the numbers."""


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves `mesh.{data,fsdp,tensor}` (one may be -1 = the rest) to concrete sizes."""
    if mesh_cfg.strategy and mesh_cfg.strategy not in STRATEGIES:
        raise MeshError(f"mesh.strategy={mesh_cfg.strategy!r}; expected one of {list(STRATEGIES)}")
    if mesh_cfg.strategy:
        sizes = dict(STRATEGIES[mesh_cfg.strategy])
    else:
        sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fixed <= 0 or num_devices % fixed:
        raise MeshError(
            f"mesh {sizes} needs a multiple of {fixed} devices, but there are {num_devices}"
        )
    if free:
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(f"mesh {sizes} uses {fixed} devices, but there are {num_devices}")
    return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh over `devices` (default: all)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch dimension is split."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divides(mesh: jax.sharding.Mesh, global_batch: int, what: str) -> None:
    """Fails at start when the batch does not split evenly over data x fsdp."""
    shards = batch_shards(mesh)
    if global_batch % shards:
        raise MeshError(
            f"{what}={global_batch} is not divisible by the {shards} batch shards of the mesh "
            f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Sharding of a `[B, ...]` array: B over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(mesh: jax.sharding.Mesh, local_batch: dict[str, np.ndarray]) -> dict:
    """Assembles each process's `[B_local, ...]` numpy arrays into global sharded arrays."""
    return {
        name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
        for name, value in local_batch.items()
    }
