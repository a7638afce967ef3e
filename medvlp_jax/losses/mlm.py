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


def mask_tokens(
    rng: jax.Array,
    input_ids: jax.Array,
    candidates: jax.Array,
    *,
    mask_token_id: int,
    vocab_size: int,
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """BERT's masking, drawn inside the step: each candidate token is selected with `prob`;
    a selected token becomes `mask_token_id` with `mask_frac`, a uniformly random vocabulary
    id with `random_frac`, and stays itself otherwise (80 / 10 / 10 by default).

    Args:
      rng: a `jax.random` key (the step's; a new draw every step).
      input_ids: `[B, T]` int token ids.
      candidates: `[B, T]` bool, the tokens that may be selected (real, non-special tokens).
    Returns:
      `(masked_ids [B, T]` int32 (the model input), `selected [B, T]` bool (positions the loss
      predicts; their labels are `input_ids`)).
    """
    if not 0.0 <= prob <= 1.0 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
        raise ValueError(
            f"MLM probabilities: prob={prob}, mask_frac={mask_frac}, random_frac={random_frac}; "
            "need 0 <= prob <= 1 and mask_frac + random_frac <= 1"
        )
    k_select, k_kind, k_random = jax.random.split(rng, 3)
    selected = jax.random.bernoulli(k_select, prob, input_ids.shape) & candidates.astype(bool)
    kind = jax.random.uniform(k_kind, input_ids.shape)
    random_ids = jax.random.randint(k_random, input_ids.shape, 0, vocab_size, jnp.int32)
    ids = input_ids.astype(jnp.int32)
    replaced = jnp.where(kind < mask_frac, jnp.int32(mask_token_id), ids)
    replaced = jnp.where(
        (kind >= mask_frac) & (kind < mask_frac + random_frac), random_ids, replaced
    )
    return jnp.where(selected, replaced, ids), selected
