"""Small building blocks shared by every encoder: annotated dense/norm/embedding factories.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); the mapping to
mesh axes lives in `medvlp_jax.parallel`. Logical names used by the models:

`vocab, embed, mlp, heads, kv, position, proj, conv_in, conv_out, layers` and `None`
(replicated: spatial conv taps, token-type rows, scalars).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.batch_norm import GLOBAL, BatchNormMode, ShardedBatchNorm

Dtype = Any
Initializer = Callable[..., jax.Array]


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's GELU approximation `x * sigmoid(1.702 x)`."""
    return x * jax.nn.sigmoid(1.702 * x)


# Keys are Hugging Face `hidden_act` names, so configs round-trip through `config.json`.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name` (a Hugging Face `hidden_act` value)."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} is not supported; choose one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def partitioned(init: Initializer, *names: str | None) -> Initializer:
    """`init` whose result is boxed with the logical axis `names` (one per dimension)."""
    return nn.with_logical_partitioning(init, names)


def he_conv_init() -> Initializer:
    """He (fan_out, normal) init of a conv kernel [kh, kw, in, out], as torchvision's ResNet,
    boxed with the logical axes (kh, kw, conv_in, conv_out)."""
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    return partitioned(init, None, None, "conv_in", "conv_out")


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    init_std: float = 0.02,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """A `nn.Dense` [.., in] -> [.., features] with kernel axes `axes` = (in, out) names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=partitioned(nn.initializers.normal(init_std), *axes),
        bias_init=partitioned(nn.initializers.zeros_init(), axes[1]),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def layer_norm(
    epsilon: float,
    *,
    axis_name: str = "embed",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.LayerNorm:
    """A `nn.LayerNorm` over the last axis whose scale/bias are annotated with `axis_name`.

    Variance is computed in two passes (E[(x - mean)^2]) as PyTorch does, not E[x^2] - mean^2.
    """
    return nn.LayerNorm(
        epsilon=epsilon,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones_init(), axis_name),
        bias_init=partitioned(nn.initializers.zeros_init(), axis_name),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def batch_norm(
    *,
    train: bool,
    use_scale: bool = True,
    use_bias: bool = True,
    axis_name: str = "conv_out",
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    mode: BatchNormMode = GLOBAL,
    name: str | None = None,
) -> nn.Module:
    """A batch norm layer (PyTorch defaults: momentum 0.1 there = 0.9 here, eps 1e-5).

    `train=True` normalises with batch statistics and updates `batch_stats` (apply with
    `mutable=['batch_stats']`). With the default `mode` it is Flax's `nn.BatchNorm`: under
    `jax.jit` with a sharded batch the statistics are over the global batch, and running
    variances average the biased batch variance (PyTorch averages the unbiased one: a factor
    n / (n - 1) on each update). Other modes (`models.batch_norm`: per-device statistics as
    DDP without SyncBatchNorm, PyTorch's unbiased running variance) build `ShardedBatchNorm`,
    with the same parameter and statistic names. Batch variances are two-pass in both.
    """
    kw = dict(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        use_scale=use_scale,
        use_bias=use_bias,
        scale_init=partitioned(nn.initializers.ones_init(), axis_name),
        bias_init=partitioned(nn.initializers.zeros_init(), axis_name),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )
    if mode.is_default:
        return nn.BatchNorm(use_fast_variance=False, **kw)
    return ShardedBatchNorm(mode, **kw)


def embedding(
    num: int,
    features: int,
    axes: tuple[str | None, str | None],
    *,
    init_std: float = 0.02,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Embed:
    """A `nn.Embed` table [num, features] annotated with `axes`."""
    return nn.Embed(
        num,
        features,
        embedding_init=partitioned(nn.initializers.normal(init_std), *axes),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op unless axis rules are active)."""
    return nn.with_logical_constraint(x, names)
