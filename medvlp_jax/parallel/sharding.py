"""Logical-axis rules and parameter shardings: the one place that maps model names to mesh axes.

Models annotate parameters and activations with logical names only (`embed, mlp, heads, kv,
vocab, conv_in, conv_out, batch, length, ...`). A parameter's mesh layout is decided here:

1. `tensor`: dimensions whose logical name is in `TENSOR_AXES` split over the tensor axis.
2. `fsdp`: the largest remaining dimension that the fsdp axis divides (big_vision/MaxText style
   fully-sharded data parallelism); parameters under `MIN_FSDP_SIZE` elements stay replicated.

A dimension that a mesh axis does not divide stays replicated rather than failing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from medvlp_jax.parallel.mesh import BATCH_AXES

TENSOR_AXES = ("mlp", "heads", "vocab")
MIN_FSDP_SIZE = 1024

# Activation rules, active while models run (`with nn.logical_axis_rules(ACTIVATION_RULES)`).
ACTIVATION_RULES = (
    ("batch", BATCH_AXES),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
)


def _param_spec(shape: tuple[int, ...], logical: PartitionSpec | None, mesh) -> PartitionSpec:
    """Mesh PartitionSpec for one parameter of `shape` with logical names `logical`."""
    names = tuple(logical) if logical is not None else ()
    names = names + (None,) * (len(shape) - len(names))
    spec: list = [None] * len(shape)
    tensor = mesh.shape["tensor"]
    for dim, name in enumerate(names):
        if tensor > 1 and name in TENSOR_AXES and shape[dim] % tensor == 0:
            spec[dim] = "tensor"
            break
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and int(np.prod(shape)) >= MIN_FSDP_SIZE:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
        if free:
            spec[max(free, key=lambda d: shape[d])] = "fsdp"
    return PartitionSpec(*spec)


def strip_boxes(tree) -> object:
    """The tree with `nn.Partitioned` boxes replaced by their values (no sharding constraint)."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def variable_shardings(abstract_variables, mesh) -> object:
    """NamedShardings for an (abstract, possibly `nn.Partitioned`-boxed) variables tree.

    Returns a tree with the structure of `strip_boxes(abstract_variables)`.
    """
    logical = nn.get_partition_spec(abstract_variables)
    unboxed = strip_boxes(abstract_variables)
    return jax.tree.map(
        lambda leaf, spec: NamedSharding(mesh, _param_spec(tuple(leaf.shape), spec, mesh)),
        unboxed,
        logical,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def _dict_key_suffix(path) -> tuple[str, ...]:
    """The trailing run of dict keys of a key path (a parameter's own path inside a state)."""
    keys: list[str] = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(str(entry.key))
    return tuple(reversed(keys))


def shardings_like_params(tree, params, param_shardings, mesh) -> object:
    """Shardings for an optimizer-state-like `tree`: a leaf that ends in a parameter's path with
    the parameter's shape (Adam moments, momentum) is sharded like it; the rest is replicated."""
    by_path = {
        _dict_key_suffix(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.leaves(param_shardings),
            strict=True,
        )
    }

    def pick(path, leaf):
        shape, sharding = by_path.get(_dict_key_suffix(path), (None, None))
        return sharding if shape == leaf.shape else replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def replicated(mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh` (scalars, small state)."""
    return NamedSharding(mesh, PartitionSpec())
