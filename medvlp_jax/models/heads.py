"""Pooling and projection heads shared by methods: attention pooling and MLP/BN projectors."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.attention import MultiHeadAttention, key_padding_mask
from medvlp_jax.models.batch_norm import BatchNormMode
from medvlp_jax.models.layers import (
    Dtype,
    activation,
    batch_norm,
    dense,
    layer_norm,
    partitioned,
)

FINAL_NORMS = ("none", "bn", "bn_no_affine")


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of x [B, N, D] over N where mask [B, N] is 1 -> [B, D] (zeros if nothing is kept)."""
    if mask is None:
        return jnp.mean(x, axis=1)
    m = mask.astype(x.dtype)[..., None]
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)


def sentence_embedding(tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Sentence-transformers pooling (all-MiniLM-L6-v2): mean of tokens [B, T, D] over the
    mask [B, T], L2-normalised -> [B, D]."""
    mean = masked_mean(tokens, attention_mask)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


class AttentionPool(nn.Module):
    """CLIP-style attention pooling (OpenAI CLIP's AttentionPool2d, also over sets).

    The (masked) mean token is prepended to the inputs, a learned positional embedding
    [1 + N, D] is added (if `num_positions` = 1 + N is set), and the mean token attends over
    all tokens with multi-head attention whose output projection maps to `out_features`.
    Params: posemb, attn (query, key, value, out).
    """

    num_heads: int
    out_features: int | None = None
    num_positions: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x [B, N, D] or [B, h, w, D], mask [B, N] (1 = keep) -> [B, out_features or D]."""
        if x.ndim == 4:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        b, n, d = x.shape
        seq = jnp.concatenate([masked_mean(x, mask)[:, None], x], axis=1)
        if self.num_positions is not None:
            if self.num_positions != n + 1:
                raise ValueError(f"AttentionPool has {self.num_positions} positions, got 1 + {n}")
            posemb = self.param(
                "posemb",
                partitioned(nn.initializers.normal(d**-0.5), "position", "embed"),
                (self.num_positions, d),
                self.param_dtype,
            )
            seq = seq + posemb.astype(seq.dtype)
        full_mask = None
        if mask is not None:
            full_mask = jnp.concatenate([jnp.ones((b, 1), bool), mask.astype(bool)], axis=1)
        attn = MultiHeadAttention(
            self.num_heads,
            out_features=self.out_features,
            init_std=d**-0.5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )
        return attn(seq[:, :1], seq, mask=key_padding_mask(full_mask))[:, 0]


class MLPHead(nn.Module):
    """Linear -> [BN] -> act, repeated, then a final Linear -> optional final BN.

    features: output width of every Linear (the last one is the head's output).
    final_norm: 'none', 'bn' or 'bn_no_affine' (BatchNorm without scale and bias, as M-FLAG's
      projectors end). M-FLAG: `MLPHead((2048, 1024), final_norm='bn_no_affine')` is
      Linear -> BN -> ReLU -> Linear -> BN(no scale/bias).
    bn: how the batch norms compute their train-mode statistics (`models.batch_norm`).
    Params: fc{i}, bn{i}, and bn_final.
    """

    features: Sequence[int]
    batch_norm: bool = True
    bn: BatchNormMode = BatchNormMode()
    final_norm: str = "none"
    activation: str = "relu"
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """x [..., D] -> [..., features[-1]]; `train` selects batch statistics for the BNs."""
        if self.final_norm not in FINAL_NORMS:
            raise ValueError(f"final_norm {self.final_norm!r} is not one of {FINAL_NORMS}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm_kw = dict(train=train, mode=self.bn, **kw)
        last = len(self.features) - 1
        for i, width in enumerate(self.features):
            axes = ("embed" if i == 0 else "mlp", "mlp" if i < last else "proj")
            x = dense(width, axes, use_bias=self.use_bias, name=f"fc{i}", **kw)(x)
            if i < last:
                if self.batch_norm:
                    x = batch_norm(axis_name="mlp", name=f"bn{i}", **norm_kw)(x)
                x = activation(self.activation)(x)
        if self.final_norm != "none":
            affine = self.final_norm == "bn"
            x = batch_norm(
                use_scale=affine, use_bias=affine, axis_name="proj", name="bn_final", **norm_kw
            )(x)
        return x


class MLMHead(nn.Module):
    """BERT's masked-language-model head: Dense(D) -> activation -> LayerNorm, then a vocabulary
    projection (no bias) plus a separate `bias` [V] (HF's `BertOnlyMLMHead`, untied).
    Params: transform, transform_norm, decoder, bias."""

    vocab_size: int
    activation: str = "gelu"
    layer_norm_eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> logits [..., vocab_size] (float32)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(x.shape[-1], ("embed", "mlp"), name="transform", **kw)(x)
        h = activation(self.activation)(h)
        h = layer_norm(self.layer_norm_eps, axis_name="mlp", name="transform_norm", **kw)(h)
        logits = dense(self.vocab_size, ("mlp", "vocab"), use_bias=False, name="decoder", **kw)(h)
        bias = self.param(
            "bias", partitioned(nn.initializers.zeros_init(), "vocab"), (self.vocab_size,)
        )
        return (logits + bias.astype(logits.dtype)).astype(jnp.float32)
