"""Losses of the downstream dense heads: segmentation (BCE + soft Dice) and CenterNet
detection (penalty-reduced focal loss on the heatmap, L1 on size and offset). fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medvlp_jax.losses.common import f32


def soft_dice_loss(logits: jax.Array, targets: jax.Array, eps: float = 1.0) -> jax.Array:
    """1 - soft Dice per class over the whole batch, averaged over classes: logits / targets
    `[B, H, W, C]`.

    Dice_c = (2 sum(p t) + eps) / (sum(p) + sum(t) + eps), sums over batch and pixels, with
    p = sigmoid(logits) (nnU-Net's batch Dice). Per-image Dice would reward predicting
    nothing: most images have no region of a given finding, and each of them would score 1
    (measured: hard Dice 0 after 100 steps, with the soft loss at 0.3).
    """
    p, t = jax.nn.sigmoid(f32(logits)), f32(targets)
    inter = jnp.sum(p * t, axis=(0, 1, 2))
    total = jnp.sum(p, axis=(0, 1, 2)) + jnp.sum(t, axis=(0, 1, 2))
    return 1.0 - jnp.mean((2.0 * inter + eps) / (total + eps))


def segmentation_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict]:
    """Mean pixel BCE + soft Dice (`[B, H, W, C]` logits and 0/1 targets) -> (loss, parts)."""
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(f32(logits), f32(targets)))
    dice = soft_dice_loss(logits, targets)
    return bce + dice, {"loss_bce": bce, "loss_dice": dice}


def centernet_focal_loss(logits: jax.Array, heatmap: jax.Array) -> jax.Array:
    """CenterNet's penalty-reduced pixel focal loss (alpha 2, beta 4), summed and divided by
    the number of centres (at least 1): logits / Gaussian target heatmap `[B, h, w, C]`,
    centres where the target is exactly 1."""
    logits, heatmap = f32(logits), f32(heatmap)
    log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    p = jnp.exp(log_p)
    centre = heatmap == 1.0
    positive = -((1 - p) ** 2) * log_p
    negative = -((1 - heatmap) ** 4) * p**2 * log_not_p
    num = jnp.maximum(jnp.sum(centre), 1)
    return jnp.sum(jnp.where(centre, positive, negative)) / num


def masked_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of |pred - target| `[B, h, w, 2]` where mask `[B, h, w]` is 1, over the centres."""
    m = f32(mask)[..., None]
    return jnp.sum(jnp.abs(f32(pred) - f32(target)) * m) / jnp.maximum(jnp.sum(m[..., 0]), 1.0)


def centernet_loss(
    outputs: dict[str, jax.Array], targets: dict[str, jax.Array], size_weight: float = 0.1
) -> tuple[jax.Array, dict]:
    """focal(heatmap) + size_weight * L1(size) + L1(offset), as CenterNet weighs them.

    outputs: `CenterNetHead` outputs; targets: `heatmap` `[B, h, w, C]`, `size`, `offset`
    `[B, h, w, 2]`, `center_mask` `[B, h, w]`.
    """
    focal = centernet_focal_loss(outputs["heatmap"], targets["heatmap"])
    size = masked_l1(outputs["size"], targets["size"], targets["center_mask"])
    offset = masked_l1(outputs["offset"], targets["offset"], targets["center_mask"])
    loss = focal + size_weight * size + offset
    return loss, {"loss_heatmap": focal, "loss_size": size, "loss_offset": offset}
