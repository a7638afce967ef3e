"""Image-text contrastive losses over the global batch: CLIP InfoNCE and SigLIP.

Three ways to compute the same numbers (same value and gradient, see the tests):

- `clip_loss` / `siglip_loss` on the global `[B, D]` embeddings. Under `jax.jit` with a
  batch-sharded input the gather is implicit, and each device may hold the full `[B, B]` logits.
- `chunk_size=` on those: the rows are processed in blocks of `chunk_size` with `lax.scan` and
  rematerialisation, so only `[chunk_size, B]` logits are live at once (one device, big batch).
- `sharded_clip_loss` / `sharded_siglip_loss`: `jax.shard_map` over the batch axes of a mesh.
  Each device normalises its own rows, all-gathers the other modality's `[B, D]` embeddings and
  builds only its `[B_local, B]` block of logits: image rows against all texts for the
  image->text CE, and its text rows against all images for the text->image CE. Each CE is then
  row-wise within one block, so no cross-device log-sum-exp is needed; the per-device sums are
  `psum`med. `chunk_size` applies to the local rows as well.

Temperatures live in log space as parameters (as in big_vision); the losses take the value
(`scale = logit_scale(log_scale)`), so a fixed-temperature method just passes a constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from medvlp_jax.losses.common import PRECISION, f32, l2_normalize

CLIP_LOG_SCALE_INIT = math.log(1 / 0.07)
CLIP_MAX_SCALE = 100.0
SIGLIP_LOG_SCALE_INIT = math.log(10.0)
SIGLIP_BIAS_INIT = -10.0
BATCH_AXES = ("data", "fsdp")

Metrics = dict[str, jax.Array]


def logit_scale(log_scale: jax.Array, max_scale: float | None = CLIP_MAX_SCALE) -> jax.Array:
    """The logit scale `min(exp(log_scale), max_scale)` from its log-space parameter.

    The clip acts on the *value* in the forward pass; the parameter itself is never changed.
    While the clip is active the gradient with respect to `log_scale` is exactly 0, so a
    parameter that has grown past `log(max_scale)` stays where it is (weight decay, if applied
    to it, pulls it back). OpenAI's CLIP instead clamps the parameter in place after each step;
    both give the same scale in the forward pass. `max_scale=None` disables the clip (PRIOR's
    original, SigLIP).

    Args:
      log_scale: `[]` float, the learnable parameter, initialised e.g. to `CLIP_LOG_SCALE_INIT`
        (`log(1/0.07)`) or `SIGLIP_LOG_SCALE_INIT` (`log(10)`).
      max_scale: upper bound on the value, or None.
    Returns:
      `[]` float32.
    """
    scale = jnp.exp(f32(log_scale))
    return scale if max_scale is None else jnp.minimum(scale, max_scale)


def _clip_block(q: jax.Array, k: jax.Array, scale: jax.Array, labels: jax.Array) -> jax.Array:
    """`[2]` = (sum of row-wise CE, number of argmax hits) of `scale * q @ k.T` vs `labels`.

    q `[c, D]`, k `[B, D]` (both unit rows), labels `[c]` column index of each row's positive.
    """
    logits = scale * jnp.dot(q, k.T, precision=PRECISION)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=1) - picked
    hits = jnp.argmax(logits, axis=1) == labels
    return jnp.stack([jnp.sum(nll), jnp.sum(hits.astype(jnp.float32))])


def _siglip_block(
    q: jax.Array, k: jax.Array, scale_bias: tuple[jax.Array, jax.Array], labels: jax.Array
) -> jax.Array:
    """`[2]` = (sum of -log_sigmoid(z * (scale q.k + bias)), argmax hits), z = +1 at `labels`."""
    scale, bias = scale_bias
    logits = scale * jnp.dot(q, k.T, precision=PRECISION) + bias
    positive = jnp.arange(k.shape[0])[None, :] == labels[:, None]
    nll = -jax.nn.log_sigmoid(jnp.where(positive, logits, -logits))
    hits = jnp.argmax(logits, axis=1) == labels
    return jnp.stack([jnp.sum(nll), jnp.sum(hits.astype(jnp.float32))])


Block = Callable[[jax.Array, jax.Array, object, jax.Array], jax.Array]


def _sum_over_rows(
    block: Block, q: jax.Array, k: jax.Array, params, offset, chunk_size: int | None
) -> jax.Array:
    """Sums `block` over the rows of `q` [b, D] (row r's positive is column `offset + r` of k),
    in one piece or in rematerialised chunks of `chunk_size` rows."""
    rows = q.shape[0]
    labels = offset + jnp.arange(rows)
    if chunk_size is None or chunk_size >= rows:
        return block(q, k, params, labels)
    if chunk_size <= 0 or rows % chunk_size:
        raise ValueError(f"chunk_size={chunk_size} must be positive and divide the {rows} rows")
    chunks = rows // chunk_size
    step = jax.checkpoint(block)
    xs = (q.reshape(chunks, chunk_size, -1), labels.reshape(chunks, chunk_size))
    per_chunk = jax.lax.map(lambda x: step(x[0], k, params, x[1]), xs)
    return jnp.sum(per_chunk, axis=0)


def _check_pair(img: jax.Array, txt: jax.Array) -> None:
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"img {img.shape} and txt {txt.shape} must both be [B, D]")


def _clip_result(i2t: jax.Array, t2i: jax.Array, batch: int) -> tuple[jax.Array, Metrics]:
    loss_i2t, loss_t2i = i2t[0] / batch, t2i[0] / batch
    metrics = {
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "i2t_acc": i2t[1] / batch,
        "t2i_acc": t2i[1] / batch,
    }
    return (loss_i2t + loss_t2i) / 2, metrics


def _siglip_result(total: jax.Array, batch: int) -> tuple[jax.Array, Metrics]:
    return total[0] / batch, {"i2t_acc": total[1] / batch}


def clip_loss(
    img: jax.Array, txt: jax.Array, scale: jax.Array, *, chunk_size: int | None = None
) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE over the (global) batch.

    `zi, zt = l2norm(img), l2norm(txt)`, `S = scale * zi @ zt.T` `[B, B]`,
    `L = (CE(S, arange(B)) + CE(S.T, arange(B))) / 2`. Computed in float32.

    Args:
      img: `[B, D]` image embeddings (any float dtype).
      txt: `[B, D]` text embeddings; row b is the positive of image b.
      scale: `[]` logit scale (a value, e.g. `logit_scale(log_scale)`, or a fixed 1/temperature).
      chunk_size: if set (must divide B), rows are processed in blocks of this size so only
        `[chunk_size, B]` logits are live at once; same value and gradient.
    Returns:
      `(loss, metrics)`: loss `[]` float32; metrics `loss_i2t`, `loss_t2i` (the two CE terms)
      and `i2t_acc`, `t2i_acc` (fraction of rows whose argmax is the positive).
    """
    _check_pair(img, txt)
    zi, zt, scale = l2_normalize(img), l2_normalize(txt), f32(scale)
    i2t = _sum_over_rows(_clip_block, zi, zt, scale, 0, chunk_size)
    t2i = _sum_over_rows(_clip_block, zt, zi, scale, 0, chunk_size)
    return _clip_result(i2t, t2i, img.shape[0])


def siglip_loss(
    img: jax.Array,
    txt: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, Metrics]:
    """Sigmoid pairwise loss (SigLIP) over the (global) batch.

    `L = -(1/B) sum_i sum_j log_sigmoid(z_ij * (scale * zi_i.zt_j + bias))`, z_ij = +1 if i == j
    else -1, with l2-normalised embeddings. Symmetric in img/txt by construction.

    Args:
      img: `[B, D]` image embeddings.
      txt: `[B, D]` text embeddings; row b is the positive of image b.
      scale: `[]` the *value* t (SigLIP keeps `log t` as the parameter, init
        `SIGLIP_LOG_SCALE_INIT` = log 10, and uses `exp`, unclipped:
        `logit_scale(log_t, max_scale=None)`).
      bias: `[]` learnable bias b, init `SIGLIP_BIAS_INIT` = -10.
      chunk_size: as in `clip_loss`.
    Returns:
      `(loss, metrics)`: loss `[]` float32; metrics `i2t_acc`.
    """
    _check_pair(img, txt)
    zi, zt = l2_normalize(img), l2_normalize(txt)
    total = _sum_over_rows(_siglip_block, zi, zt, (f32(scale), f32(bias)), 0, chunk_size)
    return _siglip_result(total, img.shape[0])


def _batch_axes(mesh: Mesh, batch_axes: Sequence[str], batch: int) -> tuple[str, ...]:
    """Validates `batch_axes` against `mesh` and the global batch size."""
    axes = tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if not axes or missing:
        raise ValueError(
            f"batch_axes={axes}: {missing or 'empty'} not among the mesh axes {mesh.axis_names}"
        )
    shards = math.prod(mesh.shape[a] for a in axes)
    if batch % shards:
        raise ValueError(f"global batch {batch} is not divisible by the {shards} shards of {axes}")
    return axes


def _shard_rows(per_shard, mesh: Mesh, axes: tuple[str, ...], img, txt, params):
    """Runs `per_shard(img_local, txt_local, params)` with the batch split over `axes`."""
    rows = PartitionSpec(axes, None)
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(rows, rows, PartitionSpec()),
        out_specs=PartitionSpec(),
    )(img, txt, params)


def _gather(axes: tuple[str, ...], z: jax.Array) -> jax.Array:
    """Inside shard_map: the `[B, D]` concatenation of every device's `[B_local, D]` rows."""
    return jax.lax.all_gather(z, axes, tiled=True)


def _row_offset(axes: tuple[str, ...], rows: int) -> jax.Array:
    """Inside shard_map: the global index of this device's first row."""
    return jax.lax.axis_index(axes) * rows


def sharded_clip_loss(
    img: jax.Array,
    txt: jax.Array,
    scale: jax.Array,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = BATCH_AXES,
    chunk_size: int | None = None,
) -> tuple[jax.Array, Metrics]:
    """`clip_loss` without a `[B, B]` matrix on any device (`jax.shard_map` over `batch_axes`).

    Each device holds `B_local = B / prod(mesh[batch_axes])` rows, gathers both modalities'
    `[B, D]` unit embeddings and computes the `[B_local, B]` image->text and text->image logit
    blocks of its own rows. Same value and gradient as `clip_loss` (tested on 8 devices).

    Args:
      img, txt: `[B, D]` global arrays (any sharding; resharded to rows over `batch_axes`).
      scale: `[]` logit scale value (replicated).
      mesh: the device mesh; every name in `batch_axes` must be one of its axes.
      batch_axes: mesh axes the batch is split over (the product must divide B).
      chunk_size: optional row chunking of the local block (must divide B_local).
    Returns:
      `(loss, metrics)` as `clip_loss`, replicated.
    """
    _check_pair(img, txt)
    axes = _batch_axes(mesh, batch_axes, img.shape[0])

    def per_shard(img, txt, scale):
        zi, zt = l2_normalize(img), l2_normalize(txt)
        offset = _row_offset(axes, zi.shape[0])
        i2t = _sum_over_rows(_clip_block, zi, _gather(axes, zt), scale, offset, chunk_size)
        t2i = _sum_over_rows(_clip_block, zt, _gather(axes, zi), scale, offset, chunk_size)
        return jax.lax.psum(i2t, axes), jax.lax.psum(t2i, axes)

    i2t, t2i = _shard_rows(per_shard, mesh, axes, img, txt, f32(scale))
    return _clip_result(i2t, t2i, img.shape[0])


def sharded_siglip_loss(
    img: jax.Array,
    txt: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = BATCH_AXES,
    chunk_size: int | None = None,
) -> tuple[jax.Array, Metrics]:
    """`siglip_loss` with each device computing only its `[B_local, B]` block of pair terms.

    The sigmoid loss is a plain sum over all `B x B` pairs, so the image rows of each device
    against all gathered texts cover it exactly once. Arguments as `sharded_clip_loss`.
    """
    _check_pair(img, txt)
    axes = _batch_axes(mesh, batch_axes, img.shape[0])

    def per_shard(img, txt, scale_bias):
        zi, zt = l2_normalize(img), l2_normalize(txt)
        offset = _row_offset(axes, zi.shape[0])
        total = _sum_over_rows(_siglip_block, zi, _gather(axes, zt), scale_bias, offset, chunk_size)
        return jax.lax.psum(total, axes)

    total = _shard_rows(per_shard, mesh, axes, img, txt, (f32(scale), f32(bias)))
    return _siglip_result(total, img.shape[0])
