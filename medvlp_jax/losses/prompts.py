"""MCPL's prompt-relation consistency loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medvlp_jax.losses.common import f32


def relation_consistency_loss(r_img: jax.Array, r_txt: jax.Array) -> jax.Array:
    """`L_p = 2 * mean |r_img - r_txt|` (the image- and text-side relation graphs should agree).

    Args:
      r_img: `[B, L, K]` image-side relation scores (MCPL: sigmoid outputs, `[B, 6, 154]`).
      r_txt: same shape, text side.
    Returns:
      `[]` float32.
    """
    if r_img.shape != r_txt.shape:
        raise ValueError(f"r_img {r_img.shape} and r_txt {r_txt.shape} must have the same shape")
    return 2.0 * jnp.mean(jnp.abs(f32(r_img) - f32(r_txt)))
