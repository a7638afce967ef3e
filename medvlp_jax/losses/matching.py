"""Image-text matching (ITM): binary classification of (image, text) pairs."""

from __future__ import annotations

import jax

from medvlp_jax.losses.common import softmax_cross_entropy


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
