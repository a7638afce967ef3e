"""Co-attention fusion (PTUnifier / METER style): two streams updating from each other.

One `CoAttentionLayer` holds one post-LN layer per stream:
`h1 = LN(x + SelfAttn(x)); h2 = LN(h1 + CrossAttn(h1, y)); out = LN(h2 + FFN(h2))`, and the same
for y with x as context; both streams read the other's *input* to the layer.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from medvlp_jax.models.attention import key_padding_mask
from medvlp_jax.models.transformer import TransformerConfig, TransformerLayer


class CoAttentionLayer(nn.Module):
    """Params: x_layer, y_layer (TransformerLayer with cross-attention each)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        y: jax.Array,
        x_mask: jax.Array | None = None,
        y_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D], y [B, N, D] (masks [B, T] / [B, N], 1 = token) -> (x', y')."""
        xm, ym = key_padding_mask(x_mask), key_padding_mask(y_mask)
        x_new = TransformerLayer(self.cfg, cross_attention=True, name="x_layer")(
            x, xm, None, y, ym, deterministic
        )
        y_new = TransformerLayer(self.cfg, cross_attention=True, name="y_layer")(
            y, ym, None, x, xm, deterministic
        )
        return x_new, y_new


class CoAttentionFusion(nn.Module):
    """`cfg.num_layers` co-attention layers (layer_0 ..), post-LN; `cfg.remat` applies."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        y: jax.Array,
        x_mask: jax.Array | None = None,
        y_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D], y [B, N, D] -> the two streams after all layers."""
        if self.cfg.norm_first:
            raise ValueError("the co-attention fusion is post-LN: set norm_first=False")
        layer_cls = (
            nn.remat(CoAttentionLayer, static_argnums=(5,)) if self.cfg.remat else CoAttentionLayer
        )
        for i in range(self.cfg.num_layers):
            x, y = layer_cls(self.cfg, name=f"layer_{i}")(x, y, x_mask, y_mask, deterministic)
        return x, y
