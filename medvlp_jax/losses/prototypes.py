"""PRIOR's sentence prototype bank (SPB): soft assignment of sentence embeddings to a codebook.

The codebook `E` `[K, D]` is a model parameter; these functions take it as an array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medvlp_jax.losses.common import PRECISION, f32, masked_mean


def gumbel_softmax(rng: jax.Array | None, logits: jax.Array, tau: float) -> jax.Array:
    """Soft Gumbel-softmax sample `softmax((logits + g) / tau)`, `g ~ Gumbel(0, 1)` i.i.d.

    Args:
      rng: a `jax.random` key, or None for the deterministic `softmax(logits / tau)`
        (evaluation).
      logits: `[..., K]`.
      tau: temperature > 0.
    Returns:
      `[..., K]` float32 weights summing to 1.
    """
    logits = f32(logits)
    if rng is not None:
        logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
    return jax.nn.softmax(logits / tau, axis=-1)


def assign_prototypes(
    x: jax.Array, codebook: jax.Array, *, rng: jax.Array | None = None, tau: float = 0.9
) -> tuple[jax.Array, jax.Array]:
    """Quantises sentence embeddings onto the prototype bank.

    `d = x E^T`, `w = gumbel_softmax(d, tau)` (soft, no straight-through), `q = w E`.

    Args:
      x: `[..., D]` sentence embeddings.
      codebook: `[K, D]` prototypes E.
      rng: key for the Gumbel noise (training); None = deterministic softmax (evaluation).
      tau: Gumbel-softmax temperature (PRIOR: 0.9).
    Returns:
      `(q [..., D], w [..., K])` in float32.
    """
    if x.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"x {x.shape} and codebook {codebook.shape} differ in width")
    codebook = f32(codebook)
    w = gumbel_softmax(rng, jnp.dot(f32(x), codebook.T, precision=PRECISION), tau)
    return jnp.dot(w, codebook, precision=PRECISION), w


def quantization_loss(q: jax.Array, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`L_q = mean |q - x|` over the valid rows' elements (no stop-gradient on either side).

    Args:
      q: `[..., D]` quantised embeddings; x: `[..., D]` the originals.
      mask: `[...]` valid rows (padding sentences = 0), or None. 0 when nothing is valid.
    Returns:
      `[]` float32.
    """
    if q.shape != x.shape:
        raise ValueError(f"q {q.shape} and x {x.shape} must have the same shape")
    diff = jnp.abs(f32(q) - f32(x))
    return masked_mean(diff, None if mask is None else mask[..., None])


def prototype_kl_loss(
    target: jax.Array, pred: jax.Array, codebook: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """`KL(softmax(target E^T) || softmax(pred E^T))`, summed over prototypes, mean over rows.

    PRIOR's `L_kl` between real sentence embeddings (target) and generated slots (pred).

    Args:
      target: `[..., D]`; pred: `[..., D]`; codebook: `[K, D]`.
      mask: `[...]` valid rows, or None. 0 when nothing is valid.
    Returns:
      `[]` float32 (>= 0).
    """
    if target.shape != pred.shape:
        raise ValueError(f"target {target.shape} and pred {pred.shape} must have the same shape")
    codebook = f32(codebook)
    log_p = jax.nn.log_softmax(jnp.dot(f32(target), codebook.T, precision=PRECISION), axis=-1)
    log_q = jax.nn.log_softmax(jnp.dot(f32(pred), codebook.T, precision=PRECISION), axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return masked_mean(kl, mask)
