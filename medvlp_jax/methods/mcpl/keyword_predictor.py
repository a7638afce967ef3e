"""The keyword predictor: AP keywords for images without a report.

A multi-label head over both vocabularies (anatomy + pathology, V words) on the *frozen*
image features (the un-prompted backbone's `pooler_output`, under `stop_gradient`). It is
trained alongside the prompts on the pre-training reports' keywords (its loss touches only
its own weights) and, at inference, its thresholded sigmoid picks the words whose token
sequences feed the image side's AP prompts.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medvlp_jax.models.layers import Dtype, dense, layer_norm


class KeywordPredictor(nn.Module):
    """features [B, D] -> keyword logits [B, V] float32: LN -> [Dense(hidden) -> GELU] ->
    Dense(V), computing in `dtype` (LN statistics in float32). Params: norm, [hidden], out.
    """

    num_keywords: int
    hidden: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype)
        x = layer_norm(1e-5, name="norm", **kw)(features.astype(jnp.float32))
        if self.hidden:
            x = jax.nn.gelu(dense(self.hidden, ("embed", "mlp"), name="hidden", **kw)(x))
        return dense(self.num_keywords, ("mlp", None), name="out", **kw)(x).astype(jnp.float32)


def keyword_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Mean binary cross-entropy of logits [B, V] against multi-hot labels [B, V], and the
    micro-F1 of the 0.5-thresholded predictions (a metric)."""
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
    pred = logits > 0
    truth = labels > 0.5
    tp = jnp.sum(pred & truth)
    f1 = 2 * tp / jnp.maximum(jnp.sum(pred) + jnp.sum(truth), 1)
    return loss, {"keyword_bce": loss, "keyword_f1": f1}
