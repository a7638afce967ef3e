"""A generic image-text two-tower model with linear projections into a joint space.

Used by the CLIP/ConVIRT baseline and as the frozen backbone of MCPL. Towers come by name from
`builders` (ViT or ResNet-50; BERT, RoBERTa or the CLIP causal text transformer).

Params: `image` (tower), `text` (tower), `image_proj`, `text_proj` (Dense -> embed_dim),
`log_scale` [] (log of the logit scale, big_vision style), `bias` [] (SigLIP only).
The towers compute in their configs' dtypes, the projections in `dtype`; embeddings come out
float32 (they feed losses), and `log_scale` / `bias` are float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from medvlp_jax.models.builders import build_image_tower, build_text_tower
from medvlp_jax.models.heads import masked_mean
from medvlp_jax.models.layers import Dtype, dense, partitioned

TEXT_POOLING = ("mean", "first", "pooled")


def pool_text(outputs: dict, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """Sentence feature `[B, D]` from a text tower's outputs.

    'mean': masked mean of `tokens` (sentence-transformers, e.g. MiniLM); 'first': the first
    token ([CLS]); 'pooled': the tower's own `pooled` (CLIP text: projected EOT token).
    """
    if pooling == "mean":
        return masked_mean(outputs["tokens"], attention_mask)
    if pooling == "first":
        return outputs["tokens"][:, 0]
    if pooling == "pooled":
        return outputs["pooled"]
    raise ValueError(f"text pooling {pooling!r}; expected one of {TEXT_POOLING}")


class TwoTower(nn.Module):
    """Image tower + text tower + projections + temperature.

    Attributes:
      image_cfg, text_cfg: tower configs (`builders.tower_config`), frozen for hashing.
      embed_dim: joint space width E.
      text_pooling: see `pool_text`.
      log_scale_init: initial log logit scale (log(1/0.07) for CLIP, log(10) for SigLIP).
      with_bias: add SigLIP's learnable logit bias (init `bias_init`).
      dtype: compute dtype of the projections (`precision.compute_dtype`; params float32).
    """

    image_cfg: ml_collections.FrozenConfigDict
    text_cfg: ml_collections.FrozenConfigDict
    embed_dim: int
    text_pooling: str = "mean"
    log_scale_init: float = 2.6592600369644043  # log(1 / 0.07)
    with_bias: bool = False
    bias_init: float = -10.0
    dtype: Dtype = jnp.float32

    def setup(self):
        self.image = build_image_tower(ml_collections.ConfigDict(self.image_cfg))
        self.text = build_text_tower(ml_collections.ConfigDict(self.text_cfg))
        proj = dict(use_bias=False, dtype=self.dtype)
        self.image_proj = dense(self.embed_dim, ("embed", "proj"), **proj)
        self.text_proj = dense(self.embed_dim, ("embed", "proj"), **proj)
        self.log_scale = self.param(
            "log_scale", partitioned(nn.initializers.constant(self.log_scale_init)), (), jnp.float32
        )
        if self.with_bias:
            self.bias = self.param(
                "bias", partitioned(nn.initializers.constant(self.bias_init)), (), jnp.float32
            )

    def image_features(self, images: jax.Array, *, train: bool = False, **kw) -> dict:
        """images `[B, H, W, C]` -> the image tower's outputs dict."""
        return self.image(images, train=train, **kw)

    def text_features(
        self, input_ids: jax.Array, attention_mask: jax.Array, *, train: bool = False, **kw
    ) -> dict:
        """input_ids, attention_mask `[B, T]` -> the text tower's outputs dict."""
        return self.text(input_ids, attention_mask, train=train, **kw)

    def embed_images(self, images: jax.Array, *, train: bool = False, **kw) -> jax.Array:
        """images `[B, H, W, C]` -> `[B, E]` float32 (not normalised)."""
        pooled = self.image_features(images, train=train, **kw)["pooled"]
        return self.image_proj(pooled).astype(jnp.float32)

    def embed_texts(
        self, input_ids: jax.Array, attention_mask: jax.Array, *, train: bool = False, **kw
    ) -> jax.Array:
        """input_ids, attention_mask `[B, T]` -> `[B, E]` float32 (not normalised)."""
        out = self.text_features(input_ids, attention_mask, train=train, **kw)
        pooled = pool_text(out, attention_mask, self.text_pooling)
        return self.text_proj(pooled).astype(jnp.float32)

    def __call__(
        self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *, train=False
    ) -> tuple[jax.Array, jax.Array, dict]:
        """-> (image emb `[B, E]`, text emb `[B, E]`, {'log_scale', 'bias'?})."""
        zimg = self.embed_images(images, train=train)
        ztxt = self.embed_texts(input_ids, attention_mask, train=train)
        extras = {"log_scale": self.log_scale}
        if self.with_bias:
            extras["bias"] = self.bias
        return zimg, ztxt, extras
