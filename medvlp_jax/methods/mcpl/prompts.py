"""MCPL's small prompt modules: GPCM prompt production, per-layer prompt update, relation head.

Notation: n prompt tokens per modality (2), D the width of the module's input, B batch.
Every attention here is single-head; projections are `Dense` with bias unless `use_bias=False`
(the released code has none). `dtype` is the compute dtype of the projections and attention
products (params float32); the layer norm statistics and the softmax run in float32.

- `Gpcm` (graph-guided prompt collaboration), per deep layer c, on the 2K joint prompt nodes
  `X = [Pt_c ; Pi_c]` `[2K, D]` (K = n by default; the released code has K = 16):
      H = LN(X)
      A = softmax((H Wq + bq)(H Wk + bk)^T / sqrt(D))        Wq, Wk: D -> D/4   (A: [2K, 2K])
      Y = A (H Wv + bv)                                       Wv: D -> D, no residual
  rows 0:n of Y are the text prompts, rows n:2n the image prompts (with K = n: the image
  nodes; with K > n, as the released code reads them: text nodes); A is the learned
  adjacency between the prompt nodes.
- `PromptUpdate`, per deep layer and modality, prompts `P` `[B, n, D]` reading the context
  `F = [a tokens ; p tokens ; previous prompt outputs]` `[B, S, D]` (key mask `[B, S]` or
  None: every position is a key, as the released code):
      Z = softmax((P Wq + bq)(F Wk + bk)^T / sqrt(D) + mask) (F Wv + bv) + P
  Wq, Wk: D -> D / qk_divisor (1 here, 4 in the released code; the scale stays 1/sqrt(D)).
- `RelationHead`, per deep layer and modality, the prompt-to-keyword relation "graph":
      R = sigmoid((Z Wq' + bq')(K Wk' + bk')^T) * mask         Wq', Wk': D -> d_r
  with `K = [a tokens ; p tokens]` `[B, 2L, D]`; padded keyword positions are set to 0 (in
  both modalities alike, so they add nothing to `|R_img - R_txt|`; mask None keeps them, as
  the released code). d_r = `dim`, or D/4 with dim = 0 (the released code). q', k' start
  small (std 0.02), so R starts near 0.5 instead of saturating.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.layers import Dtype, dense, layer_norm


def _softmax_attention(q: jax.Array, k: jax.Array, mask: jax.Array | None, scale: float):
    """softmax(q k^T * scale) over the last axis with key mask [B, S] (1 = keep); the product
    runs in q's dtype, the softmax in float32, and the weights come back in q's dtype."""
    logits = jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[..., None, :] > 0, logits, jnp.finfo(logits.dtype).min)
    return jax.nn.softmax(logits, axis=-1).astype(q.dtype)


class Gpcm(nn.Module):
    """Joint attention over the text and image prompt nodes of one layer (module docstring).

    `__call__(nodes [2K, D]) -> (Y [2K, D], A [2K, 2K])`. Params: norm, query, key, value.
    """

    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, nodes: jax.Array) -> tuple[jax.Array, jax.Array]:
        d, kw = nodes.shape[-1], dict(use_bias=self.use_bias, dtype=self.dtype)
        h = layer_norm(1e-5, name="norm", dtype=self.dtype)(nodes)
        q = dense(max(d // 4, 1), ("embed", "kv"), name="query", **kw)(h)
        k = dense(max(d // 4, 1), ("embed", "kv"), name="key", **kw)(h)
        v = dense(d, ("embed", None), name="value", **kw)(h)
        adjacency = _softmax_attention(q, k, None, d**-0.5)
        return adjacency @ v, adjacency


class PromptUpdate(nn.Module):
    """Z = attention(P over F) + P (module docstring). Params: query, key, value."""

    qk_divisor: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, prompts: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
        """prompts [B, n, D], context [B, S, D], mask [B, S] (1 = keep) or None -> [B, n, D]."""
        d, kw = prompts.shape[-1], dict(use_bias=self.use_bias, dtype=self.dtype)
        qk = max(d // self.qk_divisor, 1)
        q = dense(qk, ("embed", None), name="query", **kw)(prompts)
        k = dense(qk, ("embed", None), name="key", **kw)(context)
        v = dense(d, ("embed", None), name="value", **kw)(context)
        return _softmax_attention(q, k, mask, d**-0.5) @ v + prompts


class RelationHead(nn.Module):
    """R = sigmoid(q'(Z) k'(K)^T) * mask (module docstring). Params: query, key."""

    dim: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, prompts: jax.Array, keywords: jax.Array, mask: jax.Array | None
    ) -> jax.Array:
        """prompts [B, n, D], keywords [B, S, D], mask [B, S] or None -> relations [B, n, S]
        float32."""
        kw = dict(use_bias=self.use_bias, dtype=self.dtype)
        dim = self.dim or max(prompts.shape[-1] // 4, 1)
        q = dense(dim, ("embed", "kv"), name="query", **kw)(prompts)
        k = dense(dim, ("embed", "kv"), name="key", **kw)(keywords)
        r = jax.nn.sigmoid(jnp.einsum("bnd,bsd->bns", q, k).astype(jnp.float32))
        return r if mask is None else r * mask[:, None, :].astype(jnp.float32)
