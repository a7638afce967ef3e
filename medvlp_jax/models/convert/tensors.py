"""Checkpoint tensors <-> Flax variables: layout transforms, assignment and clear errors.

A `TensorMap` names one checkpoint tensor (PyTorch layout), the Flax variable it fills (path in
the *unrolled* layer layout, `.../layer_3/...`) and how the layout differs (`kind`). Modules
built with `scan=True` keep layers stacked under `.../layers/...`; `assign` and `extract`
stack and unstack per-layer tensors automatically, so one name map serves both layouts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

import jax
import numpy as np
from flax import traverse_util

KINDS = ("copy", "linear", "heads_in", "heads_bias", "heads_out", "conv", "lead1", "lead2")
_LAYER = re.compile(r"^layer_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint does not fit the module; the message names tensors, shapes and files."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One checkpoint tensor `name` <-> the Flax variable at (`collection`, *`path`).

    kind: 'copy' (same layout), 'linear' ([out, in] <-> [in, out]), 'heads_in'
      ([H*K, D] <-> [D, H, K]), 'heads_bias' ([H*K] <-> [H, K]), 'heads_out'
      ([D, H*K] <-> [H, K, D]), 'conv' ([O, I, kh, kw] <-> [kh, kw, I, O]), 'lead1' / 'lead2'
      ([1, ...] / [1, 1, ...] <-> [...]).
    resize: a positional table [prefix + h*w, D] that may be bicubically resized on import.
    sum_rgb: a conv stem whose RGB input channels are summed when the module has 1 channel.
    """

    name: str
    path: tuple[str, ...]
    kind: str = "copy"
    collection: str = "params"
    resize: bool = False
    sum_rgb: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown tensor kind {self.kind!r}")


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape of a Flax variable of `shape` laid out as `kind`."""
    if kind == "copy":
        return tuple(shape)
    if kind == "linear":
        return tuple(reversed(shape))
    if kind == "heads_in":
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_bias":
        return (shape[0] * shape[1],)
    if kind == "heads_out":
        return (shape[2], shape[0] * shape[1])
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    return (1,) * (1 if kind == "lead1" else 2) + tuple(shape)


def to_flax(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Checkpoint tensor -> Flax layout `shape` (the inverse of `to_torch`)."""
    if kind == "linear":
        return x.T
    if kind == "heads_in":
        return x.T.reshape(shape)
    if kind == "heads_out":
        return x.T.reshape(shape)
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    return x.reshape(shape)


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    """Flax variable -> checkpoint layout."""
    if kind == "linear":
        return x.T
    if kind == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    return x.reshape(torch_shape(kind, x.shape))


def _stacked_target(key: tuple[str, ...], flat: dict) -> tuple[tuple[str, ...], int] | None:
    """For an unrolled key (.., layer_i, ..) absent from `flat`: (stacked key, i) if present."""
    for pos, part in enumerate(key):
        m = _LAYER.match(part)
        if m:
            stacked = (*key[:pos], "layers", *key[pos + 1 :])
            if stacked in flat:
                return stacked, int(m.group(1))
    return None


def _fmt(names: Iterable[str], limit: int = 40) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _unbox(tree):
    """Strips Flax axis-metadata boxes *without* sharding constraints: `nn.meta.unbox` applies
    them, which fails on host/abstract values under active logical axis rules (the trainer
    loads pre-trained weights inside `nn.logical_axis_rules`)."""
    import flax.linen as nn

    return nn.meta.map_axis_meta(lambda box: box.unbox(apply_constraint=False), tree)


def assign(
    tensors: dict[str, np.ndarray],
    maps: list[TensorMap],
    abstract_variables,
    *,
    source: str,
    ignore: Callable[[str], bool] = lambda name: False,
    resize_fn: Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None = None,
) -> dict:
    """Variables (nested dict of numpy arrays) for a module from checkpoint `tensors`.

    abstract_variables: the module's (boxed or unboxed) variables or `jax.eval_shape` of its
      init; the result has exactly its structure, shapes and dtypes.
    source: the file named in error messages. ignore: checkpoint names to skip silently
      (buffers, heads, the other tower). resize_fn(table, target_shape) resizes positional
      tables marked `resize`.
    Raises CheckpointError listing missing tensors, unused tensors, shape mismatches, or
    module variables that no tensor fills.
    """
    flat = traverse_util.flatten_dict(_unbox(abstract_variables))
    missing = [m.name for m in maps if m.name not in tensors]
    used = {m.name for m in maps}
    extra = [n for n in tensors if n not in used and not ignore(n)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the module needs are missing: {_fmt(missing)}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) the module does not use: {_fmt(extra)}")
    if problems:
        raise CheckpointError(f"checkpoint {source}: " + "; ".join(problems))

    out: dict[tuple[str, ...], np.ndarray] = {}
    stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for m in maps:
        key = (m.collection, *m.path)
        layer = None
        if key not in flat:
            found = _stacked_target(key, flat)
            if found is None:
                raise CheckpointError(
                    f"checkpoint {source}: tensor {m.name!r} maps to {'/'.join(key)}, which "
                    "this module does not have (was it built with other options?)"
                )
            key, layer = found
        target = flat[key]
        shape = tuple(target.shape[1:] if layer is not None else target.shape)
        x = np.asarray(tensors[m.name])
        if m.sum_rgb and x.ndim == 4 and x.shape[1] == 3 and torch_shape(m.kind, shape)[1] == 1:
            x = x.sum(axis=1, keepdims=True)
        expected = torch_shape(m.kind, shape)
        if x.shape != expected:
            if m.resize and resize_fn is not None and len(x.shape) == len(expected):
                x = to_torch(m.kind, resize_fn(to_flax(m.kind, x, x.shape[-2:]), shape))
            else:
                raise CheckpointError(
                    f"checkpoint {source}: tensor {m.name!r} has shape {tuple(x.shape)} but the "
                    f"module expects {expected} (Flax {'/'.join(key)} {shape})"
                )
        value = to_flax(m.kind, x, shape).astype(target.dtype)
        if layer is None:
            out[key] = value
        else:
            stacks.setdefault(key, {})[layer] = value
    for key, layers in stacks.items():
        n = flat[key].shape[0]
        if sorted(layers) != list(range(n)):
            raise CheckpointError(
                f"checkpoint {source}: {'/'.join(key)} stacks {n} layers but the checkpoint "
                f"has layers {sorted(layers)}"
            )
        out[key] = np.stack([layers[i] for i in range(n)])
    unfilled = [k for k in flat if k not in out]
    if unfilled:
        raise CheckpointError(
            f"checkpoint {source}: no tensor fills the module variable(s) "
            f"{_fmt('/'.join(k) for k in unfilled)}"
        )
    return traverse_util.unflatten_dict(out)


def extract(variables, maps: list[TensorMap]) -> dict[str, np.ndarray]:
    """Checkpoint tensors (PyTorch layout, float32) from module variables; inverse of `assign`."""
    flat = traverse_util.flatten_dict(jax.device_get(_unbox(variables)))
    out = {}
    for m in maps:
        key = (m.collection, *m.path)
        if key in flat:
            x = flat[key]
        else:
            found = _stacked_target(key, flat)
            if found is None:
                raise KeyError(f"module variables lack {'/'.join(key)} (for {m.name!r})")
            x = flat[found[0]][found[1]]
        out[m.name] = np.array(to_torch(m.kind, np.asarray(x, np.float32)), order="C")
    return out
