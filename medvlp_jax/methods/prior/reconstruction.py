"""PRIOR's cross-modal conditional reconstruction modules: the image decoder and the
sentence-slot decoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.layers import Dtype, batch_norm, layer_norm, partitioned
from medvlp_jax.models.resnet import conv
from medvlp_jax.models.transformer import TransformerConfig, TransformerStack


def upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling of x [B, h, w, C] -> [B, 2h, 2w, C]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ImageDecoder(nn.Module):
    """Reconstructs the image from its (channel-dropped) local map and the text context.

    `z = concat(Dropout2d_p(image_map), text_map)` (2E channels), then `num_blocks` x
    (nearest x2, 2 x (Conv3x3 no bias -> BN -> ReLU)) with the width halved at each block
    (PRIOR at E=768: 768, 384, 192, 96, 48), and a Conv3x3 (with bias) to `out_channels`.
    Params: block{i}_conv{1,2}, block{i}_bn{1,2}, head.
    """

    num_blocks: int
    out_channels: int
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_map: jax.Array, text_map: jax.Array, *, train: bool) -> jax.Array:
        """image_map, text_map [B, h, w, E] -> image [B, h * 2^n, w * 2^n, out_channels]."""
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        dropped = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(
            image_map, deterministic=not train
        )
        z = jnp.concatenate([dropped, text_map], axis=-1).astype(self.dtype)
        width = z.shape[-1]
        if width >> self.num_blocks < 1:
            raise ValueError(
                f"the image decoder halves its {width} channels {self.num_blocks} times; "
                "raise config.model.embed_dim"
            )
        for i in range(self.num_blocks):
            width //= 2
            z = upsample2(z)
            for j in (1, 2):
                z = conv(width, 3, name=f"block{i}_conv{j}", **kw)(z)
                z = nn.relu(batch_norm(train=train, name=f"block{i}_bn{j}", **kw)(z))
        head = nn.Conv(
            self.out_channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            kernel_init=partitioned(nn.initializers.lecun_normal(), None, None, "conv_in", None),
            name="head",
            **kw,
        )
        return head(z).astype(jnp.float32)


class SlotDecoder(nn.Module):
    """Learned queries through a BERT-style decoder that cross-attends to image tokens.

    The queries ([Q, E] ~ N(0, 1)) go through LayerNorm and dropout (BERT's embedding block;
    its position and token-type embeddings are constants added to learned queries, so they
    are left out), then `cfg.num_layers` post-LN layers with self-attention (causal if
    `causal`, as the released code's `is_decoder=True`) and cross-attention.
    Params: queries, embed_norm, layers (layer_0 ..).
    """

    cfg: TransformerConfig
    num_queries: int
    causal: bool = False

    @nn.compact
    def __call__(self, context: jax.Array, *, train: bool) -> jax.Array:
        """context [B, N, E] image tokens -> slots [B, Q, E] float32."""
        c = self.cfg
        queries = self.param(
            "queries",
            partitioned(nn.initializers.normal(1.0), None, "embed"),
            (self.num_queries, c.width),
            c.param_dtype,
        )
        x = jnp.broadcast_to(queries, (context.shape[0], *queries.shape))
        x = layer_norm(
            c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name="embed_norm"
        )(x.astype(c.dtype))
        x = nn.Dropout(c.dropout_rate)(x, deterministic=not train)
        stack = TransformerStack(c, cross_attention=True, causal=self.causal, name="layers")
        x, _ = stack(x, None, context=context.astype(c.dtype), deterministic=not train)
        return x.astype(jnp.float32)
