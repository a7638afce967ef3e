"""PRIOR's local alignment: sigmoid cross-attention between sentences and image patches, and
the negative-free (SimSiam) local image loss.

Batched over reports with a sentence mask; a padded sentence is never attended and gets no
gradient. The within-report local text loss is `losses.local.local_infonce_loss`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from medvlp_jax.losses.common import PRECISION, f32, l2_normalize, masked_mean


def sigmoid_cross_attention(
    q_text: jax.Array,
    k_image: jax.Array,
    v_image: jax.Array,
    q_image: jax.Array,
    k_text: jax.Array,
    v_text: jax.Array,
    mask: jax.Array,
) -> dict[str, jax.Array]:
    """Single-head cross-attention both ways with a sigmoid instead of a softmax.

    `A1 = sigmoid(Q_t K_i^T / sqrt(D))` `[B, S, N]`, `c_t = A1 V_i` (image context per
    sentence); `A2 = sigmoid(Q_i K_t^T / sqrt(D))` `[B, N, S]` with padded sentences' columns
    set to 0, `c_i = A2 V_t` (text context per patch). Rows of `A1` / `c_t` for padded
    sentences are computed but meaningless: mask them in the losses.

    Args:
      q_text, k_text, v_text: `[B, S, D]` sentence projections.
      q_image, k_image, v_image: `[B, N, D]` patch projections.
      mask: `[B, S]` valid sentences (bool or 0/1).
    Returns:
      `{'c_text' [B, S, D], 'c_image' [B, N, D], 'a_text' [B, S, N], 'a_image' [B, N, S]}`,
      float32.
    """
    d = q_text.shape[-1]
    valid = mask.astype(bool)[:, None, :]
    a1 = jax.nn.sigmoid(
        jnp.einsum("bsd,bnd->bsn", f32(q_text), f32(k_image), precision=PRECISION) / math.sqrt(d)
    )
    scores2 = jnp.einsum("bnd,bsd->bns", f32(q_image), f32(k_text), precision=PRECISION)
    a2 = jnp.where(valid, jax.nn.sigmoid(scores2 / math.sqrt(d)), 0.0)
    return {
        "c_text": jnp.einsum("bsn,bnd->bsd", a1, f32(v_image), precision=PRECISION),
        "c_image": jnp.einsum("bns,bsd->bnd", a2, f32(v_text), precision=PRECISION),
        "a_text": a1,
        "a_image": a2,
    }


def negative_cosine(p: jax.Array, z: jax.Array) -> jax.Array:
    """`[...]` `-cos(p, stop_gradient(z))` along the last axis (SimSiam's D)."""
    return -jnp.sum(l2_normalize(p) * jax.lax.stop_gradient(l2_normalize(z)), axis=-1)


def simsiam_loss(
    p_x: jax.Array, p_y: jax.Array, x: jax.Array, y: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """`0.5 * [mean D(P(x), y) + mean D(P(y), x)]`, the symmetric SimSiam loss.

    PRIOR's local image loss with x = the patch features I, y = their text contexts c_i.

    Args:
      p_x, p_y: `[..., D]` predictor outputs P(x), P(y).
      x, y: `[..., D]` the targets (stop-gradient applied here).
      mask: `[...]` positions that count (PRIOR: the patches of reports with a sentence; a
        report without one has no text context), broadcastable; None = all.
    Returns:
      `[]` float32 in [-1, 1]: the mean over the positions that count (0 if none).
    """
    d = negative_cosine(p_x, y) + negative_cosine(p_y, x)
    return 0.5 * masked_mean(d, mask)
