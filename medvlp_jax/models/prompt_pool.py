"""Soft prompt pools: a learned table of rows, the top-k rows nearest a query stand in for a
missing modality (PTUnifier's pseudo tokens).

The selection is a hard top-k, so it has no gradient; the *gathered rows* do: a loss on the
selected prompts trains exactly the rows that were selected (`stop_gradient` on the scores,
gradient through the gather). The released code selects under `torch.no_grad()`, which also
cuts the gradient into the rows, so its pools never train (`freeze_pools` reproduces it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SIMILARITIES = ("dot", "cosine")


def prompt_scores(query: jax.Array, pool: jax.Array, similarity: str = "dot") -> jax.Array:
    """`[B, P]` float32 scores of every pool row for every query.

    Args:
      query: `[B, D]` one query per example.
      pool: `[P, D]` the prompt table.
      similarity: 'dot' (raw dot product, the released code) or 'cosine'.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"prompt similarity {similarity!r} is not one of {SIMILARITIES}")
    q, p = query.astype(jnp.float32), pool.astype(jnp.float32)
    if similarity == "cosine":
        q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
    return q @ p.T


def select_prompts(
    query: jax.Array, pool: jax.Array, k: int, similarity: str = "dot"
) -> tuple[jax.Array, jax.Array]:
    """The `k` pool rows with the highest scores for each query, best first.

    Args:
      query: `[B, D]`; pool: `[P, D]` with `P >= k`; similarity: see `prompt_scores`.
    Returns:
      `(rows [B, k, D]` in the pool's dtype (gradient flows into the selected rows only),
      `indices [B, k]` int32)`.
    """
    if not 0 < k <= pool.shape[0]:
        raise ValueError(f"cannot select k={k} prompts from a pool of {pool.shape[0]} rows")
    scores = jax.lax.stop_gradient(prompt_scores(query, pool, similarity))
    _, indices = jax.lax.top_k(scores, k)
    return jnp.take(pool, indices, axis=0), indices.astype(jnp.int32)
