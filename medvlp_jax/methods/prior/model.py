"""PRIOR's model: towers, projections, poolers, local cross-attention, the sentence prototype
bank and (stage 3) the reconstruction decoders.

Shapes: B reports, N = h*w image regions, S sentences (`max_sentences`), E `embed_dim`,
K prototypes, Q slot queries.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from medvlp_jax.losses.local_alignment import sigmoid_cross_attention
from medvlp_jax.losses.prototypes import assign_prototypes
from medvlp_jax.methods.prior.reconstruction import ImageDecoder, SlotDecoder
from medvlp_jax.models.builders import build_image_tower, build_text_tower
from medvlp_jax.models.heads import AttentionPool, MLPHead
from medvlp_jax.models.layers import Dtype, dense, partitioned
from medvlp_jax.models.transformer import TransformerConfig

LOCAL_ATTENTION = (
    "query_image",
    "key_image",
    "value_image",
    "query_text",
    "key_text",
    "value_text",
)


def sentence_means(tokens: jax.Array, sentence_ids: jax.Array, num_sentences: int):
    """Masked mean of token features per sentence.

    Args:
      tokens: `[B, T, E]`; sentence_ids: `[B, T]` int (-1 = no sentence).
      num_sentences: S.
    Returns:
      `(sentences [B, S, E] float32 (zeros where empty), mask [B, S] bool)`.
    """
    onehot = (sentence_ids[..., None] == jnp.arange(num_sentences)).astype(jnp.float32)
    sums = jnp.einsum("bts,bte->bse", onehot, tokens.astype(jnp.float32))
    counts = jnp.sum(onehot, axis=1)
    return sums / jnp.maximum(counts, 1.0)[..., None], counts > 0


def local_tokens(feature_map: jax.Array, nchw_order: bool) -> jax.Array:
    """`[B, h, w, C]` -> `[B, h*w, C]` region tokens, row-major. `nchw_order=True` reproduces
    the released code's `view(B, -1, C)` of an NCHW map without a permute, which mixes
    channels and positions into each "token"."""
    b, h, w, c = feature_map.shape
    if nchw_order:
        return jnp.transpose(feature_map, (0, 3, 1, 2)).reshape(b, h * w, c)
    return feature_map.reshape(b, h * w, c)


def token_map(tokens: jax.Array, grid: tuple[int, int], nchw_order: bool) -> jax.Array:
    """`[B, h*w, E]` -> `[B, h, w, E]`, the inverse layout of `local_tokens` (with
    `nchw_order`: the released code's `view(B, E, h, w)`, then NHWC)."""
    b, _, e = tokens.shape
    if nchw_order:
        return jnp.transpose(tokens.reshape(b, e, *grid), (0, 2, 3, 1))
    return tokens.reshape(b, *grid, e)


class PriorModel(nn.Module):
    """Attributes:
    image_cfg, text_cfg: tower configs (frozen for hashing); image 'resnet50' or 'vit'.
    grid: (h, w) of the image tower's last feature map at the training resolution.
    embed_dim: E. pool_heads: heads of both attention pools.
    prototypes: create the sentence prototype bank (`codebook` [K, E]); num_prototypes: K.
    gumbel_tau: the bank's Gumbel-softmax temperature.
    reconstruction: create the image decoder and the slot decoder (stage 3).
    decoder_cfg, num_queries, causal_decoder: the slot decoder.
    decoder_blocks, image_channels, image_dropout: the image decoder.
    nchw_local_tokens: the released code's NCHW flattening (see `local_tokens`).
    dtype: compute dtype of projections and heads (params float32).
    """

    image_cfg: ml_collections.FrozenConfigDict
    text_cfg: ml_collections.FrozenConfigDict
    grid: tuple[int, int]
    embed_dim: int
    pool_heads: int = 8
    prototypes: bool = False
    num_prototypes: int = 512
    gumbel_tau: float = 0.9
    reconstruction: bool = False
    decoder_cfg: TransformerConfig | None = None
    num_queries: int = 16
    causal_decoder: bool = False
    decoder_blocks: int = 5
    image_channels: int = 1
    image_dropout: float = 0.5
    nchw_local_tokens: bool = False
    log_scale_init: float = 4.605170185988092  # log(100)
    dtype: Dtype = jnp.float32

    def setup(self):
        e, kw = self.embed_dim, dict(dtype=self.dtype)
        self.image = build_image_tower(ml_collections.ConfigDict(self.image_cfg))
        self.text = build_text_tower(ml_collections.ConfigDict(self.text_cfg))
        n = self.grid[0] * self.grid[1]
        self.image_pool = AttentionPool(self.pool_heads, num_positions=1 + n, **kw)
        self.global_image_proj = dense(e, ("embed", "proj"), **kw)
        self.local_image_proj = dense(e, ("embed", "proj"), **kw)
        self.local_text_proj = dense(e, ("embed", "proj"), **kw)
        self.text_pool = AttentionPool(self.pool_heads, **kw)
        self.local_attention = {name: dense(e, ("embed", "proj"), **kw) for name in LOCAL_ATTENTION}
        self.predictor = MLPHead((e // 2, e), batch_norm=False, **kw)
        scale_init = nn.initializers.constant(self.log_scale_init)
        self.log_scale = self.param("log_scale", scale_init, ())
        self.local_log_scale = self.param("local_log_scale", scale_init, ())
        if self.prototypes:
            self.codebook = self.param(
                "codebook",
                partitioned(nn.initializers.normal(1.0), "vocab", "embed"),
                (self.num_prototypes, e),
            )
        if self.reconstruction:
            self.image_decoder = ImageDecoder(
                self.decoder_blocks, self.image_channels, self.image_dropout, self.dtype
            )
            self.slot_decoder = SlotDecoder(self.decoder_cfg, self.num_queries, self.causal_decoder)

    # --- encoders ------------------------------------------------------------------------

    def feature_map(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """images [B, H, W, C] -> the tower's last feature map [B, h, w, C_img]."""
        out = self.image(images, train=train)
        if "feature_map" in out:
            return out["feature_map"]
        patches = out["tokens"][:, 1:]  # ViT: drop the class token
        return patches.reshape(patches.shape[0], *self.grid, patches.shape[-1])

    def encode_image(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """images -> {'local' [B, N, E], 'global' [B, E]} float32."""
        fmap = self.feature_map(images, train=train)
        local = self.local_image_proj(local_tokens(fmap, self.nchw_local_tokens))
        pooled = self.image_pool(fmap.reshape(fmap.shape[0], -1, fmap.shape[-1]))
        return {
            "local": local.astype(jnp.float32),
            "global": self.global_image_proj(pooled).astype(jnp.float32),
        }

    def encode_sentences(
        self, input_ids, attention_mask, sentence_ids, num_sentences: int, *, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """Tokens [B, T] -> (sentence embeddings [B, S, E] float32, mask [B, S] bool)."""
        tokens = self.text(input_ids, attention_mask, train=train)["tokens"]
        return sentence_means(self.local_text_proj(tokens), sentence_ids, num_sentences)

    def quantize(self, sentences: jax.Array, rng: jax.Array | None) -> jax.Array:
        """Sentence embeddings [..., E] -> their prototype mixtures [..., E] (`rng` None:
        deterministic softmax)."""
        return assign_prototypes(sentences, self.codebook, rng=rng, tau=self.gumbel_tau)[0]

    def pool_text(self, sentences: jax.Array, mask: jax.Array) -> jax.Array:
        """Sentences [B, S, E], mask [B, S] -> report embedding [B, E] float32."""
        return self.text_pool(sentences, mask).astype(jnp.float32)

    def cross_attend(self, local: jax.Array, sentences: jax.Array, mask: jax.Array) -> dict:
        """`sigmoid_cross_attention` with this model's projections: local [B, N, E],
        sentences [B, S, E], mask [B, S]."""
        p = {
            name: layer(sentences if "text" in name else local)
            for name, layer in self.local_attention.items()
        }
        return sigmoid_cross_attention(
            p["query_text"], p["key_image"], p["value_image"],
            p["query_image"], p["key_text"], p["value_text"], mask,
        )  # fmt: skip

    def predict(self, x: jax.Array) -> jax.Array:
        """The SimSiam predictor [..., E] -> [..., E] float32."""
        return self.predictor(x).astype(jnp.float32)

    # --- reconstruction ------------------------------------------------------------------

    def reconstruct_image(self, local: jax.Array, context: jax.Array, *, train: bool):
        """local, context (c_i) [B, N, E] -> reconstructed image [B, H, W, C] float32."""
        to_map = lambda t: token_map(t, self.grid, self.nchw_local_tokens)
        return self.image_decoder(to_map(local), to_map(context), train=train)

    def generate_slots(self, local: jax.Array, *, train: bool) -> jax.Array:
        """local [B, N, E] -> sentence slots [B, Q, E] float32."""
        return self.slot_decoder(local, train=train)

    def __call__(self, images, input_ids, attention_mask, sentence_ids, num_sentences: int):
        """Creates every parameter (init): the stage-1 path plus the enabled extras."""
        img = self.encode_image(images)
        sentences, mask = self.encode_sentences(
            input_ids, attention_mask, sentence_ids, num_sentences
        )
        if self.prototypes:
            sentences = self.quantize(sentences, None)
        ctx = self.cross_attend(img["local"], sentences, mask)
        out = {
            "global_text": self.pool_text(sentences, mask),
            "predicted": self.predict(img["local"]),
            "scales": (self.log_scale, self.local_log_scale),
        }
        if self.reconstruction:
            out["image"] = self.reconstruct_image(img["local"], ctx["c_image"], train=False)
            out["slots"] = self.generate_slots(img["local"], train=False)
        return out
