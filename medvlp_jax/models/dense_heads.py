"""Heads on an image encoder's feature pyramid: a U-Net-style decoder, and the segmentation
and CenterNet detection heads built on it.

A pyramid is a tuple of NHWC maps `[B, h_i, w_i, C_i]`, fine to coarse (`Method.
feature_pyramid`: ResNet stages at strides 4-32; a ViT's patch grid, with a hybrid stem's
stride-4 and stride-8 maps before it). The decoder starts at the coarsest map and, level by
level, upsamples (bilinear) to the next finer one, concatenates that level's 1x1-projected
features and mixes them with two 3x3 conv + GroupNorm + ReLU blocks (U-Net, Ronneberger et
al. 2015); below the finest level it keeps doubling until it reaches `out_stride`. Heads
add 1x1 convs. No batch norm: the heads hold no running statistics, so frozen-encoder and
fine-tuned runs train them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.layers import Dtype, he_conv_init, partitioned

# CenterNet's heatmap bias init: sigmoid(-2.19) = 0.1 (Zhou et al. 2019, from focal loss).
HEATMAP_BIAS_INIT = -2.19
GROUPS = 8


def conv2d(features: int, kernel: int, *, name: str, bias_init: float = 0.0, dtype: Dtype):
    """A 'SAME' conv with bias, He init, logical axes (kh, kw, conv_in, conv_out)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        padding="SAME",
        kernel_init=he_conv_init(),
        bias_init=partitioned(nn.initializers.constant(bias_init), "conv_out"),
        dtype=dtype,
        name=name,
    )


class ConvBlock(nn.Module):
    """Two (3x3 conv -> GroupNorm -> ReLU) layers: [B, h, w, C] -> [B, h, w, width]."""

    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(2):
            x = conv2d(self.width, 3, name=f"conv{i}", dtype=self.dtype)(x)
            x = nn.GroupNorm(min(GROUPS, self.width), dtype=self.dtype, name=f"norm{i}")(x)
            x = nn.relu(x)
        return x


def _resize(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    if x.shape[1:3] == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), "bilinear")


class UNetDecoder(nn.Module):
    """pyramid (fine to coarse), image side -> features `[B, S / out_stride, S / out_stride,
    width]` (see the module docstring). `out_stride` must be a power of two."""

    width: int = 64
    out_stride: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pyramid: Sequence[jax.Array], image_size: int) -> jax.Array:
        if not pyramid:
            raise ValueError("UNetDecoder needs at least one feature map")
        maps = [m.astype(self.dtype) for m in pyramid]
        x = conv2d(self.width, 1, name="lateral_top", dtype=self.dtype)(maps[-1])
        x = ConvBlock(self.width, self.dtype, name="block_top")(x)
        for i, skip in reversed(list(enumerate(maps[:-1]))):
            lateral = conv2d(self.width, 1, name=f"lateral{i}", dtype=self.dtype)(skip)
            x = jnp.concatenate([_resize(x, skip.shape[1:3]), lateral], axis=-1)
            x = ConvBlock(self.width, self.dtype, name=f"block{i}")(x)
        target = image_size // self.out_stride
        level = 0
        while x.shape[1] < target:
            x = _resize(x, (min(2 * x.shape[1], target), min(2 * x.shape[2], target)))
            x = ConvBlock(self.width, self.dtype, name=f"up{level}")(x)
            level += 1
        return x


class SegmentationHead(nn.Module):
    """pyramid -> mask logits `[B, S, S, num_classes]` float32: the decoder at stride
    `out_stride`, a 1x1 conv, then bilinear upsampling to the image side S."""

    num_classes: int
    width: int = 64
    out_stride: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pyramid: Sequence[jax.Array], image_size: int) -> jax.Array:
        x = UNetDecoder(self.width, self.out_stride, self.dtype, name="decoder")(
            pyramid, image_size
        )
        logits = conv2d(self.num_classes, 1, name="classifier", dtype=self.dtype)(x)
        return _resize(logits.astype(jnp.float32), (image_size, image_size))


class CenterNetHead(nn.Module):
    """pyramid -> CenterNet outputs at stride `out_stride` (Zhou et al., "Objects as
    Points", 2019), float32: `heatmap` logits `[B, h, w, num_classes]`, `size` `[B, h, w, 2]`
    (box width, height in output cells) and `offset` `[B, h, w, 2]` (sub-cell centre)."""

    num_classes: int
    width: int = 64
    out_stride: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pyramid: Sequence[jax.Array], image_size: int) -> dict[str, jax.Array]:
        x = UNetDecoder(self.width, self.out_stride, self.dtype, name="decoder")(
            pyramid, image_size
        )
        outputs = {}
        for name, channels, bias in (
            ("heatmap", self.num_classes, HEATMAP_BIAS_INIT),
            ("size", 2, 0.0),
            ("offset", 2, 0.0),
        ):
            hidden = nn.relu(conv2d(self.width, 3, name=f"{name}_hidden", dtype=self.dtype)(x))
            out = conv2d(channels, 1, name=name, bias_init=bias, dtype=self.dtype)(hidden)
            outputs[name] = out.astype(jnp.float32)
        return outputs


def decode_centernet(
    outputs: dict[str, jax.Array], top_k: int, out_stride: int
) -> dict[str, jax.Array]:
    """CenterNet decoding: peaks of the sigmoid heatmap (3x3 max-pool suppression), the
    `top_k` best over every class, boxes from size + offset, in input pixels.

    Returns `boxes` `[B, K, 4]` (x0, y0, x1, y1), `scores` `[B, K]`, `classes` `[B, K]` int32.
    """
    heat = jax.nn.sigmoid(outputs["heatmap"])
    pooled = nn.max_pool(heat, (3, 3), strides=(1, 1), padding="SAME")
    heat = jnp.where(heat == pooled, heat, 0.0)
    b, h, w, c = heat.shape
    scores, flat = jax.lax.top_k(heat.reshape(b, h * w * c), top_k)
    cell, classes = flat // c, flat % c
    ys, xs = (cell // w).astype(jnp.float32), (cell % w).astype(jnp.float32)
    take = lambda name: jnp.take_along_axis(outputs[name].reshape(b, h * w, 2), cell[..., None], 1)
    size, offset = take("size"), take("offset")
    cx, cy = xs + offset[..., 0], ys + offset[..., 1]
    half_w, half_h = size[..., 0] / 2, size[..., 1] / 2
    boxes = jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
    return {"boxes": boxes * out_stride, "scores": scores, "classes": classes.astype(jnp.int32)}
