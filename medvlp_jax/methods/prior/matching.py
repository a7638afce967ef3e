"""Hungarian matching of PRIOR's generated sentence slots to a report's sentence prototypes.

The cost is computed in JAX for the whole batch; the assignment runs on the host with
`scipy.optimize.linear_sum_assignment`, once per batch through `jax.pure_callback`. Under a
mesh the callback runs inside `jax.shard_map` over the batch axes, so each device (and so each
host) matches only its own rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from scipy.optimize import linear_sum_assignment

from medvlp_jax.losses.common import f32
from medvlp_jax.parallel.mesh import BATCH_AXES


def l1_cost(slots: jax.Array, targets: jax.Array, target_mask: jax.Array | None) -> jax.Array:
    """`[B, Q, Q]` cost `C[b, i, j] = sum_d |slots[b, i] - targets[b, j]|`, no gradient.

    With `target_mask` `[B, Q]` the columns of padded targets are 0: a constant column leaves
    the optimal assignment of the real targets unchanged, so the square problem solves the
    rectangular one (Q slots, n_b <= Q targets). With None every column counts (the released
    code: padded targets are zero vectors that the slots compete for).
    """
    cost = jnp.sum(jnp.abs(f32(slots)[:, :, None] - f32(targets)[:, None, :]), axis=-1)
    if target_mask is not None:
        cost = jnp.where(target_mask.astype(bool)[:, None, :], cost, 0.0)
    return jax.lax.stop_gradient(cost)


def hungarian_host(cost: np.ndarray) -> np.ndarray:
    """`[B, Q, Q]` costs -> `[B, Q]` int32 `col`: slot i is assigned target `col[b, i]`
    (minimum total cost per row b; scipy on the host)."""
    cost = np.asarray(cost, np.float64)
    cols = [linear_sum_assignment(c)[1] for c in cost]
    return np.asarray(cols, np.int32).reshape(cost.shape[:2])


def _assign(cost: jax.Array) -> jax.Array:
    shape = jax.ShapeDtypeStruct(cost.shape[:2], jnp.int32)
    return jax.pure_callback(hungarian_host, shape, cost, vmap_method="expand_dims")


def assign(cost: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """`[B, Q, Q]` costs -> `[B, Q]` int32 slot-to-target assignment (see `hungarian_host`).

    With `mesh`, the batch is split over `BATCH_AXES` and each shard is solved where it lives.
    """
    if mesh is None:
        return _assign(cost)
    return jax.shard_map(
        _assign,
        mesh=mesh,
        in_specs=PartitionSpec(BATCH_AXES, None, None),
        out_specs=PartitionSpec(BATCH_AXES, None),
        check_vma=False,
    )(cost)


def slot_for_target(col: jax.Array, faithful_index: bool = False) -> jax.Array:
    """`[B, Q]` index of the slot matched to each target: `argsort(col)`, the inverse of the
    slot-to-target assignment. `faithful_index=True` returns `col` itself, as the released code
    indexes (`logit[col]`): row j then holds the slot `col[j]`, which is target j's own slot
    only where the assignment is its own inverse."""
    return col if faithful_index else jnp.argsort(col, axis=-1)


def matched_slots(slots: jax.Array, index: jax.Array) -> jax.Array:
    """slots `[B, Q, D]`, index `[B, Q]` -> `[B, Q, D]` rows `slots[b, index[b, j]]`."""
    return jnp.take_along_axis(slots, index[..., None], axis=1)
