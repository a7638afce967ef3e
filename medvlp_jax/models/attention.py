"""Multi-head attention in the [B, T, H, K] layout that `jax.nn.dot_product_attention` uses.

Projections map [B, T, D] straight to [B, T, H, K] (kernel [D, H, K]) and back (kernel
[H, K, D]), so no transposes sit around the attention core.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.layers import Dtype, partitioned


class HeadsProjection(nn.Module):
    """[..., in_features] -> [..., H, K] with kernel [in_features, H, K] and bias [H, K]."""

    in_features: int
    num_heads: int
    head_dim: int
    use_bias: bool = True
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.kernel = self.param(
            "kernel",
            partitioned(nn.initializers.normal(self.init_std), "embed", "heads", "kv"),
            (self.in_features, self.num_heads, self.head_dim),
            self.param_dtype,
        )
        self.bias = (
            self.param(
                "bias",
                partitioned(nn.initializers.zeros_init(), "heads", "kv"),
                (self.num_heads, self.head_dim),
                self.param_dtype,
            )
            if self.use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), self.kernel.astype(self.dtype))
        return y if self.bias is None else y + self.bias.astype(self.dtype)


class HeadsOutput(nn.Module):
    """[..., H, K] -> [..., features] with kernel [H, K, features] and bias [features]."""

    features: int
    use_bias: bool = True
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.normal(self.init_std), "heads", "kv", "embed"),
            (x.shape[-2], x.shape[-1], self.features),
            self.param_dtype,
        )
        y = jnp.einsum("...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                partitioned(nn.initializers.zeros_init(), "embed"),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def key_padding_mask(mask: jax.Array | None) -> jax.Array | None:
    """[B, S] (1/True = attend) -> bool [B, 1, 1, S] for `jax.nn.dot_product_attention`."""
    return None if mask is None else mask.astype(bool)[:, None, None, :]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    dropout: nn.Dropout | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v over q [B, T, H, K], k/v [B, S, H, K] -> [B, T, H, K].

    `mask` is bool, broadcastable to [B, H, T, S] (True = attend). The products run in the
    inputs' dtype; softmax runs in float32 and its probabilities are cast back. Uses
    `jax.nn.dot_product_attention` (fused kernels on GPU) unless attention-probability dropout
    is active, which needs the explicit probabilities.
    """
    if dropout is None or deterministic or dropout.rate == 0.0:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    logits = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
    keep = jnp.ones(logits.shape[-2:], bool) if mask is None else mask
    if causal:
        keep = keep & jnp.tril(jnp.ones(logits.shape[-2:], bool))
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1), deterministic=False).astype(v.dtype)
    return jnp.einsum("bhts,bshk->bthk", probs, v)


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with separate query/key/value/out params.

    Params: `query`, `key`, `value` (kernel [D_in, H, K], bias [H, K] if `use_bias`) and `out`
    (kernel [H, K, D_out], bias [D_out]). With `fused_qkv`, self-attention multiplies by the three
    kernels stacked into one [D, 3, H, K] matmul (same params, same result).
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    dropout_rate: float = 0.0
    init_std: float = 0.02
    fused_qkv: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv: jax.Array | None = None,
        *,
        values: jax.Array | None = None,
        mask: jax.Array | None = None,
        causal: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        """Attention of queries from x [B, T, D] over keys from kv [B, S, E] (default x).

        values: [B, S, E] optional source of the value projection instead of kv (keys and
          values then come from different token sets; the 'qk_v' prompt configuration).
        mask: bool, broadcastable to [B, H, T, S], True = attend.
        Returns [B, T, out_features or D].
        """
        source = x if kv is None else kv
        head_dim = self.head_dim or x.shape[-1] // self.num_heads

        def projection(name: str, in_features: int) -> HeadsProjection:
            return HeadsProjection(
                in_features,
                self.num_heads,
                head_dim,
                use_bias=self.use_bias,
                init_std=self.init_std,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        query = projection("query", x.shape[-1])
        key = projection("key", source.shape[-1])
        value = projection("value", source.shape[-1])
        if self.fused_qkv and kv is None and values is None:
            q, k, v = _fused_projection(x, (query, key, value), self.dtype)
        else:
            q = query(x)
            k = key(source)
            v = value(source if values is None else values)
        dropout = nn.Dropout(self.dropout_rate) if self.dropout_rate else None
        y = attend(q, k, v, mask=mask, causal=causal, dropout=dropout, deterministic=deterministic)
        return HeadsOutput(
            self.out_features or x.shape[-1],
            init_std=self.init_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(y)


def _fused_projection(
    x: jax.Array, projections: tuple[HeadsProjection, ...], dtype: Dtype
) -> tuple[jax.Array, ...]:
    """q, k, v [B, T, H, K] from one matmul against the stacked [D, 3, H, K] kernel."""
    kernel = jnp.stack([p.kernel for p in projections], axis=1).astype(dtype)
    y = jnp.einsum("btd,dchk->btchk", x.astype(dtype), kernel)
    if projections[0].bias is not None:
        y = y + jnp.stack([p.bias for p in projections], axis=0).astype(dtype)
    return tuple(y[:, :, i] for i in range(len(projections)))
