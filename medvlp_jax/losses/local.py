"""Within-report InfoNCE between sentence-level features (PRIOR's local text loss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medvlp_jax.losses.common import NEG_INF, PRECISION, f32, l2_normalize


def _rowwise_ce(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """`[B]` mean over valid rows of CE(logits[b, s], s), columns restricted to valid ones."""
    pair_valid = valid[:, :, None] & valid[:, None, :]
    logits = jnp.where(pair_valid, logits, NEG_INF)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits, axis1=1, axis2=2)
    rows = valid.astype(jnp.float32)
    return jnp.sum(nll * rows, axis=1) / jnp.maximum(jnp.sum(rows, axis=1), 1.0)


def local_infonce_loss(
    a: jax.Array, b: jax.Array, mask: jax.Array, scale: jax.Array, *, symmetric: bool = True
) -> jax.Array:
    """InfoNCE inside each report: sentence s of `a` should match sentence s of `b`, against
    the report's other valid sentences only.

    Per report: `S_b = scale * l2norm(a_b) @ l2norm(b_b).T` `[S, S]` over its valid sentences,
    loss = mean over valid rows of CE (and, if `symmetric`, averaged with the column-wise CE).
    The batch loss is the mean over all B reports; a report with one valid sentence contributes
    exactly 0 (its single logit is its own positive), one with none contributes 0.

    Args:
      a: `[B, S, D]` e.g. image context per sentence (`c_t`).
      b: `[B, S, D]` e.g. sentence embeddings (`T`).
      mask: `[B, S]` bool/0-1 valid sentences (padding = 0).
      scale: `[]` logit scale value (PRIOR: learnable, init 100).
      symmetric: average the a->b and b->a directions (default) or a->b only.
    Returns:
      `[]` float32.
    """
    if a.shape != b.shape or a.ndim != 3 or mask.shape != a.shape[:2]:
        raise ValueError(
            f"expected a, b [B, S, D] and mask [B, S]; got {a.shape}, {b.shape}, {mask.shape}"
        )
    valid = mask.astype(bool)
    logits = f32(scale) * jnp.einsum(
        "bsd,btd->bst", l2_normalize(a), l2_normalize(b), precision=PRECISION
    )
    per_report = _rowwise_ce(logits, valid)
    if symmetric:
        per_report = 0.5 * (per_report + _rowwise_ce(jnp.swapaxes(logits, 1, 2), valid))
    return jnp.mean(per_report)
