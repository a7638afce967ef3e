"""ResNet-50 in the torchvision layout (v1.5: stride on the 3x3 conv), NHWC.

Batch norm runs in train mode (batch statistics, `batch_stats` updated; apply with
`mutable=['batch_stats']`) when `train=True`, else with the running averages.
`channels=1` gives a one-channel stem (the importer sums a pretrained RGB stem over channels).
`num_stages` < 4 stops after layer{num_stages} (`feature_map` then has 256 * 2^(num_stages-1)
channels at stride 2^(num_stages+1)); a hybrid ViT uses the trunk through layer3.

Outputs: `feature_map` [B, h, w, 2048] (layer4), `tokens` [B, h*w, 2048] (the same, flattened
row-major), `pooled` [B, 2048] (global average pool), `pyramid`: every stage's output, fine to
coarse ([B, H/4, W/4, 256], [B, H/8, W/8, 512], [B, H/16, W/16, 1024], [B, H/32, W/32, 2048]
for the four stages), for dense heads.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.batch_norm import BatchNormMode
from medvlp_jax.models.layers import Dtype, batch_norm, he_conv_init

STAGES = (("layer1", 64, 3, 1), ("layer2", 128, 4, 2), ("layer3", 256, 6, 2), ("layer4", 512, 3, 2))
EXPANSION = 4


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
) -> nn.Conv:
    """Bias-free conv with PyTorch's symmetric padding kernel // 2 and He (fan_out) init."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=he_conv_init(),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4) with batch norms and a projection shortcut if needed."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn: BatchNormMode = BatchNormMode()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = lambda name: batch_norm(train=train, mode=self.bn, name=name, **kw)
        y = nn.relu(bn("bn1")(conv(self.planes, 1, name="conv1", **kw)(x)))
        y = nn.relu(bn("bn2")(conv(self.planes, 3, self.stride, name="conv2", **kw)(y)))
        y = bn("bn3")(conv(self.planes * EXPANSION, 1, name="conv3", **kw)(y))
        if self.downsample:
            x = conv(self.planes * EXPANSION, 1, self.stride, name="downsample_conv", **kw)(x)
            x = bn("downsample_bn")(x)
        return nn.relu(x + y)


class ResNet50(nn.Module):
    """torchvision ResNet-50 trunk (no fc). Param names mirror torchvision:
    conv1, bn1, layer{1-4}_{j}/{conv1,bn1,conv2,bn2,conv3,bn3,downsample_conv,downsample_bn}.
    `bn`: how every batch norm computes its train-mode statistics (`models.batch_norm`).
    """

    channels: int = 3
    num_stages: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn: BatchNormMode = BatchNormMode()

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """images [B, H, W, C] -> {feature_map [B, h, w, 2048], tokens, pooled, pyramid}."""
        if images.ndim != 4 or images.shape[-1] != self.channels:
            raise ValueError(
                f"expected NHWC images with {self.channels} channels, got shape {images.shape}"
            )
        if not 1 <= self.num_stages <= len(STAGES):
            raise ValueError(f"ResNet num_stages={self.num_stages}; expected 1..{len(STAGES)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(64, 7, 2, name="conv1", **kw)(images.astype(self.dtype))
        x = nn.relu(batch_norm(train=train, mode=self.bn, name="bn1", **kw)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        in_features = 64
        pyramid = []
        for stage, planes, blocks, stride in STAGES[: self.num_stages]:
            for j in range(blocks):
                s = stride if j == 0 else 1
                down = j == 0 and (s != 1 or in_features != planes * EXPANSION)
                block = Bottleneck(planes, s, down, bn=self.bn, name=f"{stage}_{j}", **kw)
                x = block(x, train)
                in_features = planes * EXPANSION
            pyramid.append(x)
        b, h, w, d = x.shape
        return {
            "feature_map": x,
            "pyramid": tuple(pyramid),
            "tokens": x.reshape(b, h * w, d),
            "pooled": jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype),
        }

    def example_inputs(self, batch: int = 1, size: int = 64) -> tuple[jax.Array, ...]:
        """Dummy positional inputs for `init`: (images [batch, size, size, C],)."""
        return (jnp.zeros((batch, size, size, self.channels)),)
