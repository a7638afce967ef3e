"""Small numerical pieces shared by the losses: float32 casting, l2-normalisation, masked CE.

Every loss in this package casts its inputs to float32 first (`f32`), so a model that runs in
bfloat16 still gets its loss, log-sum-exp and reductions in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Similarity matmuls inside losses run at full float32 precision: on TPU the default f32 dot
# uses one bfloat16 pass (and TF32 on recent GPUs), an error of ~4e-3 in a cosine that a
# logit scale of 100 turns into ~0.4 nats. The [B, D] x [D, B] product is cheap either way.
PRECISION = jax.lax.Precision.HIGHEST

# Finite stand-in for -inf in masked logits: exp() underflows to exactly 0 and, unlike -inf,
# a fully masked row gives finite values (which the caller then masks out) instead of NaN.
NEG_INF = -1e30


def f32(x: jax.Array) -> jax.Array:
    """Casts to float32 (a no-op for float32 inputs)."""
    return jnp.asarray(x, jnp.float32)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """`x / max(||x||, eps)` along `axis` in float32 (as torch's F.normalize)."""
    x = f32(x)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of `values` over entries where `mask` is true; 0 (not NaN) when nothing is."""
    values = f32(values)
    if mask is None:
        return jnp.mean(values)
    weights = jnp.broadcast_to(f32(mask), values.shape)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and top-1 accuracy over the unmasked positions.

    Args:
      logits: `[..., V]` unnormalised scores (any float dtype; computed in float32).
      labels: `[...]` integer class indices. Masked positions may hold anything (e.g. -100).
      mask: `[...]` bool/0-1, or None for all positions.
    Returns:
      `(loss, accuracy)` float32 scalars; both 0 when no position is unmasked.
    """
    logits = f32(logits)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} does not match logits {logits.shape}")
    safe = labels if mask is None else jnp.where(mask, labels, 0)
    safe = safe.astype(jnp.int32)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    hits = jnp.argmax(logits, axis=-1) == safe
    return masked_mean(nll, mask), masked_mean(hits, mask)
