"""Masked language modelling loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medvlp_jax.losses.common import f32, softmax_cross_entropy


def mlm_loss(
    logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy averaged over the masked (predicted) positions only.

    Args:
      logits: `[B, T, V]` vocabulary scores.
      labels: `[B, T]` int original token ids; values at unpredicted positions are ignored
        (they may be -100 or anything else).
      mask: `[B, T]` bool/0-1, 1 where the token was selected for prediction.
    Returns:
      `(loss, {'mlm_acc', 'mlm_tokens'})`: loss and accuracy are 0 (not NaN) when no position
      is masked; `mlm_tokens` is the number of predicted positions.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V], labels and mask [B, T]; got {logits.shape}, "
            f"{labels.shape}, {mask.shape}"
        )
    loss, acc = softmax_cross_entropy(logits, labels, mask)
    return loss, {"mlm_acc": acc, "mlm_tokens": jnp.sum(f32(mask))}
