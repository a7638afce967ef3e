"""Batch norm whose train-mode statistics can stay within each device's shard of the batch.

`BatchNormMode` selects how a batch norm layer computes its training statistics:

- `stats='global'` (our default): over the whole (global) batch, whatever the mesh, as one
  device or PyTorch's SyncBatchNorm would;
- `stats='per_device'`: within each batch shard of the mesh (the rows one device holds, the
  product of the `data` and `fsdp` axes; the batch is split into that many contiguous
  slices), as PyTorch DDP without SyncBatchNorm computes them on each GPU. The running
  averages then follow shard 0's statistics: DDP broadcasts rank 0's buffers at the start of
  every forward pass and saves rank 0's model, so its running statistics are an average over
  rank 0's batches only.
- `unbiased_running_var=True`: the running variance averages the unbiased batch variance
  (x n / (n - 1), n the rows and positions behind each statistic), as `torch.nn.BatchNorm*`;
  Flax (and our default) average the biased one. Normalisation always uses the biased one.

`ShardedBatchNorm` keeps `nn.BatchNorm`'s parameter and statistic names (`scale`, `bias`;
`batch_stats/mean`, `batch_stats/var`), so checkpoints and importers are shared. The default
mode builds Flax's own `nn.BatchNorm` (`layers.batch_norm`).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.parallel.mesh import BATCH_AXES

BN_STATS = ("global", "per_device")


@dataclasses.dataclass(frozen=True)
class BatchNormMode:
    """How train-mode batch norm computes its statistics (see the module docstring)."""

    stats: str = "global"
    unbiased_running_var: bool = False

    def __post_init__(self):
        if self.stats not in BN_STATS:
            raise ValueError(f"batch norm stats {self.stats!r} is not one of {BN_STATS}")

    @property
    def is_default(self) -> bool:
        return self == GLOBAL


GLOBAL = BatchNormMode()  # the default: global-batch statistics, Flax's running variance


def batch_shards() -> int:
    """How many shards the batch dimension has on the mesh being traced under (`jax.set_mesh`;
    1 without a mesh): the product of its batch axes' sizes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES if axis in mesh.shape)


def _running_update(old: jax.Array, new: jax.Array, momentum: float) -> jax.Array:
    return momentum * old + (1.0 - momentum) * new


class ShardedBatchNorm(nn.Module):
    """Batch norm over the last axis with `mode`'s statistics (float32 statistics).

    Attributes mirror `nn.BatchNorm`'s: `momentum` (0.9 = PyTorch's 0.1), `epsilon`,
    `use_scale`, `use_bias`, the `scale_init` / `bias_init` (boxed with logical axes by the
    caller), `dtype` (output) and `param_dtype`.
    """

    mode: BatchNormMode
    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    scale_init: nn.initializers.Initializer = nn.initializers.ones_init()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, ..., C] -> the normalised x, same shape, in `dtype` (x's without one).
        Train mode needs B divisible by the number of batch shards (`per_device`)."""
        features = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            y = (x32 - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon)
        else:
            groups = batch_shards() if self.mode.stats == "per_device" else 1
            if x.shape[0] % groups:
                raise ValueError(
                    f"per-device batch norm: batch {x.shape[0]} does not divide into the "
                    f"mesh's {groups} batch shards"
                )
            grouped = x32.reshape(groups, -1, features)  # [G, rows * positions, C]
            mean = jnp.mean(grouped, axis=1, keepdims=True)
            var = jnp.mean(jnp.square(grouped - mean), axis=1, keepdims=True)  # two-pass
            y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            if not self.is_initializing():
                count = grouped.shape[1]
                shard0_var = var[0, 0]
                if self.mode.unbiased_running_var:
                    shard0_var = shard0_var * count / max(count - 1, 1)
                running_mean.value = _running_update(running_mean.value, mean[0, 0], self.momentum)
                running_var.value = _running_update(running_var.value, shard0_var, self.momentum)
        if self.use_scale:
            y = y * self.param("scale", self.scale_init, (features,), self.param_dtype)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (features,), self.param_dtype)
        return y.astype(self.dtype or x.dtype)
