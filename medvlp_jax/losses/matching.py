"""Image-text matching (ITM): binary classification of (image, text) pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medvlp_jax.losses.common import f32, softmax_cross_entropy


def itm_loss(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean 2-way cross-entropy of the ITM head.

    Args:
      logits: `[B, 2]` head outputs (class 1 = matched pair).
      labels: `[B]` int, 1 for a matched pair, 0 for a mismatched one.
      mask: `[B]` valid pairs (e.g. padding excluded), or None.
    Returns:
      `(loss, {'itm_acc'})` float32 scalars; 0 when no pair is valid.
    """
    if logits.ndim != 2 or logits.shape[-1] != 2:
        raise ValueError(f"ITM logits must be [B, 2], got {logits.shape}")
    loss, acc = softmax_cross_entropy(logits, labels, mask)
    return loss, {"itm_acc": acc}


def itm_pairs(
    rng: jax.Array, batch_size: int, similarity: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Which image each text is paired with for ITM: exactly `batch_size // 2` rows (chosen at
    random) keep their own image (label 1); every other row gets another row's image (label 0).

    Args:
      rng: a `jax.random` key.
      batch_size: B (the global batch).
      similarity: optional `[B, B]` text-to-image scores (row = text, column = image, e.g. ITC
        logits); given, a negative row draws its image from `softmax(similarity[i])` over the
        other images (hard negatives, ALBEF-style); otherwise uniformly from the other rows.
    Returns:
      `(image_index [B]` int32 (the image row paired with each text), `labels [B]` int32).
    """
    if batch_size < 2:
        raise ValueError(f"ITM needs a batch of at least 2 pairs, got {batch_size}")
    k_pos, k_neg = jax.random.split(rng)
    order = jax.random.permutation(k_pos, batch_size)
    labels = (jnp.argsort(order) < batch_size // 2).astype(jnp.int32)
    rows = jnp.arange(batch_size)
    if similarity is None:
        shift = jax.random.randint(k_neg, (batch_size,), 1, batch_size)
        other = (rows + shift) % batch_size
    else:
        if similarity.shape != (batch_size, batch_size):
            raise ValueError(
                f"similarity must be [{batch_size}, {batch_size}], got {similarity.shape}"
            )
        logits = jnp.where(jnp.eye(batch_size, dtype=bool), -jnp.inf, f32(similarity))
        other = jax.random.categorical(k_neg, jax.lax.stop_gradient(logits), axis=-1)
    return jnp.where(labels == 1, rows, other).astype(jnp.int32), labels
