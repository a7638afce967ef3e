"""Mixed precision from one switch: `config.train.compute_dtype` ('float32' | 'bfloat16').

The rule. A tower config's `dtype` field (`builders.tower_config`) defaults to '' (`FOLLOW`),
which means "compute in `train.compute_dtype`"; a tower whose `dtype` is set explicitly
('float32' or 'bfloat16') keeps it, whatever the switch says. `param_dtype` is never touched:
parameters, and so gradients and optimizer state, stay float32. A tower built from an
unresolved config (no run config around it: tests, notebooks) treats '' as float32.

`resolve(config)` returns a copy of a run config with every tower under `config.model` given
its concrete compute dtype; `methods.base.get_method` calls it, so every method sees resolved
towers (and M-FLAG's text-embedding cache key, which hashes the LM's tower config, changes
with the LM's dtype). Parts outside the towers (two-tower projections, M-FLAG's projectors,
MCPL's prompt modules, heads) take `compute_dtype(config)`. MCPL's backbone towers come from
`config.prerequisites.backbone` or a folder (`methods.mcpl.backbone.describe`), not from
`config.model`: MCPL passes them through `resolve_tower`.

What runs in the compute dtype: every Dense, Conv, Einsum and attention product. LayerNorm and
BatchNorm statistics and attention softmax are computed in float32 and cast back (Flax's norms
and `jax.nn.dot_product_attention` do so); embeddings and logits that feed a loss are cast to
float32 before it, and every loss is computed in float32.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from medvlp_jax.models.builders import DTYPES, FOLLOW, TOWER_NAMES


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """The jnp dtype named by `config.train.compute_dtype`."""
    name = config.train.compute_dtype
    if name not in DTYPES:
        raise ValueError(f"config.train.compute_dtype={name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_tower(
    tower: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """A copy of the tower config `tower` whose `dtype`, if left at `FOLLOW` (''), is
    `config.train.compute_dtype`; an explicit dtype is kept. Frozen in, frozen out."""
    compute_dtype(config)  # validate the switch
    frozen = isinstance(tower, ml_collections.FrozenConfigDict)
    out = ml_collections.ConfigDict(tower.to_dict())
    if out.get("dtype", None) == FOLLOW:
        out.dtype = config.train.compute_dtype
    return ml_collections.FrozenConfigDict(out) if frozen else out


def _is_tower(node) -> bool:
    return (
        isinstance(node, ml_collections.ConfigDict)
        and node.get("name", None) in TOWER_NAMES
        and "dtype" in node
    )


def _resolve_towers(node: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """Sets, in place, the dtype of every tower config found (recursively) under `node`."""
    for value in node.values():
        if _is_tower(value):
            if value.dtype == FOLLOW:
                value.dtype = config.train.compute_dtype
        elif isinstance(value, ml_collections.ConfigDict):
            _resolve_towers(value, config)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of the run config `config` (references resolved) in which every tower config
    under `config.model` has a concrete `dtype` (see the module docstring). Idempotent; the
    argument is not modified, so the config a run writes out keeps its '' fields."""
    compute_dtype(config)  # validate the switch
    out = config.copy_and_resolve_references()
    if "model" in out:
        _resolve_towers(out.model, out)
    return out
