"""Cosine alignment losses without negatives: M-FLAG's alignment and SimSiam-style terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medvlp_jax.losses.common import l2_normalize, masked_mean


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Row-wise cosine `[...]` of `[..., D]` inputs, in float32."""
    return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def mflag_alignment_loss(p: jax.Array, q: jax.Array) -> jax.Array:
    """M-FLAG image-text alignment: `mean_b [2 - 2 cos(p_b, q_b)] * 2`.

    `2 - 2 cos` is the squared distance of the unit vectors; the released code adds the
    symmetric term (text->image, identical) to it, hence the factor 2, i.e. `mean_b 4 - 4 cos`.
    No negatives, no temperature. The minimum is 0 (aligned), the maximum 8 (opposite).

    Args:
      p: `[B, D]` projected image embeddings.
      q: `[B, D]` projected text embeddings (normalised here as well).
    Returns:
      `[]` float32.
    """
    if p.shape != q.shape:
        raise ValueError(f"p {p.shape} and q {q.shape} must have the same shape")
    return jnp.mean(2.0 - 2.0 * _cosine(p, q)) * 2.0


def negative_cosine_loss(
    pred: jax.Array, target: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """SimSiam term `-mean cos(pred, stop_gradient(target))` over the unmasked rows.

    PRIOR's local image loss is `0.5 * (negative_cosine_loss(P(I), c_i) +
    negative_cosine_loss(P(c_i), I))`.

    Args:
      pred: `[..., D]` predictor outputs (gradients flow here).
      target: `[..., D]` targets (gradients stopped).
      mask: `[...]` bool/0-1 valid rows, or None; 0 when no row is valid.
    Returns:
      `[]` float32, in [-1, 1].
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape")
    return -masked_mean(_cosine(pred, jax.lax.stop_gradient(target)), mask)
