"""The uniform face every method shows the trainer, and the registry that picks one by name.

The trainer never branches on a method's name: it calls these methods only.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_collections

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# name -> "module:Class"; modules are imported only when their method is asked for.
REGISTRY = {
    "clip": "medvlp_jax.methods.clip:Clip",
    "mflag": "medvlp_jax.methods.mflag:MFlag",
    "mcpl": "medvlp_jax.methods.mcpl.method:Mcpl",
}


@dataclass
class SetupContext:
    """What a method may use while preparing a run (before the first step)."""

    config: ml_collections.ConfigDict
    workdir: Path
    mesh: jax.sharding.Mesh
    tokenizer: Any
    train_records: Sequence[Any]


class Method:
    """Base class: a method is a model plus its losses. Subclasses override what they need."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def setup(self, ctx: SetupContext) -> None:
        """Runs once before init: build caches, pre-train a backbone, ... Default: nothing."""

    def data_hooks(self, tokenizer) -> tuple:
        """Per-record callables adding method fields to each example (see data.pipeline)."""
        return ()

    def init(self, rng: jax.Array, batch: Batch) -> dict:
        """Returns the Flax variables (params and any mutable collections) for `batch`."""
        raise NotImplementedError

    def load_pretrained(self, variables: dict) -> dict:
        """Replaces freshly initialised weights with configured pre-trained ones (host side)."""
        return variables

    def trainable(self, params) -> Any:
        """Bool tree like `params`; False = frozen (no gradient use, no optimizer state)."""
        return jax.tree.map(lambda _: True, params)

    def loss(
        self, variables: dict, batch: Batch, rng: jax.Array, train: bool
    ) -> tuple[jax.Array, Metrics, dict]:
        """Returns (scalar loss, metrics, updated mutable collections)."""
        raise NotImplementedError

    def embed_images(self, variables: dict, batch: Batch) -> jax.Array:
        """`[B, D]` image embeddings for the evaluators."""
        raise NotImplementedError

    def embed_texts(self, variables: dict, batch: Batch) -> jax.Array:
        """`[B, D]` text embeddings (batch has input_ids, attention_mask) for the evaluators."""
        raise NotImplementedError


def get_method(config: ml_collections.ConfigDict) -> Method:
    """Instantiates the method named by `config.method`."""
    if config.method not in REGISTRY:
        raise ValueError(f"config.method={config.method!r}; known methods: {sorted(REGISTRY)}")
    module_name, _, class_name = REGISTRY[config.method].partition(":")
    return getattr(importlib.import_module(module_name), class_name)(config)
