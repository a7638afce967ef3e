"""M-FLAG's orthogonality loss: a Barlow-Twins-style penalty on the feature correlation."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from medvlp_jax.losses.common import PRECISION, f32, l2_normalize


def orthogonality_loss(
    z: jax.Array,
    *,
    lambda_offdiag: float = 0.0051,
    normalize: bool = False,
    axis_name: str | Sequence[str] | None = None,
) -> jax.Array:
    """`0.5 * (sum_i (C_ii - 1)^2 + lambda_offdiag * sum_{i != j} C_ij^2)`, `C = Z^T Z / B`.

    Z is the raw backbone feature (not centred; rows l2-normalised first if `normalize`).

    Args:
      z: `[B, D]` features (the local rows when called inside `shard_map`/`pmap`).
      lambda_offdiag: weight of the off-diagonal term (M-FLAG: 0.0051).
      normalize: l2-normalise each row before the correlation (some follow-ups do).
      axis_name: mesh axis name(s) the batch is split over. Given, `Z^T Z` and `B` are summed
        over them, so C is the global-batch matrix (identical on every device). None: C of the
        rows passed in, i.e. per device inside `shard_map` (the released code's behaviour).
    Returns:
      `[]` float32.
    """
    if z.ndim != 2:
        raise ValueError(f"z must be [B, D], got shape {z.shape}")
    z = l2_normalize(z) if normalize else f32(z)
    gram = jnp.dot(z.T, z, precision=PRECISION)
    count = jnp.asarray(z.shape[0], jnp.float32)
    if axis_name is not None:
        gram = jax.lax.psum(gram, axis_name)
        count = jax.lax.psum(count, axis_name)
    corr = gram / count
    diag = jnp.diagonal(corr)
    off = jnp.fill_diagonal(corr, 0.0, inplace=False)
    return 0.5 * (jnp.sum((diag - 1.0) ** 2) + lambda_offdiag * jnp.sum(off * off))
