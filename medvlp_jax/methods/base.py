"""The uniform face every method shows the trainer, and the registry that picks one by name.

The trainer never branches on a method's name: it calls these methods only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from medvlp_jax import precision

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# name -> "module:Class"; modules are imported only when their method is asked for.
REGISTRY = {
    "clip": "medvlp_jax.methods.clip:Clip",
    "downstream": "medvlp_jax.downstream.method:Downstream",
    "mflag": "medvlp_jax.methods.mflag:MFlag",
    "mcpl": "medvlp_jax.methods.mcpl.method:Mcpl",
    "prior": "medvlp_jax.methods.prior.method:Prior",
    "ptunifier": "medvlp_jax.methods.ptunifier.method:PTUnifier",
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
        """Runs once per stage before init: build caches (M-FLAG's frozen-LM embeddings), ...
        Runs this run needs first are `config.prerequisites`, not setup work. Default: nothing."""

    def data_hooks(self, tokenizer) -> tuple:
        """Per-record callables adding method fields to each example (see data.pipeline)."""
        return ()

    def init(self, rng: jax.Array, batch: Batch) -> dict:
        """Returns the Flax variables (params and any mutable collections) for `batch`."""
        raise NotImplementedError

    def importers(self) -> dict[str, Callable[[str], dict]]:
        """The subtrees whose weights a foreign checkpoint (a Hugging Face folder, 'minilm', a
        torchvision `.safetensors`) may provide: '/'-joined params path -> `source -> that
        subtree's variables` ({'params'[, 'batch_stats']}, host arrays). `config.init` loads
        name one as `into` (see `medvlp_jax.weights`). Default: none."""
        return {}

    def group_rules(self) -> tuple[str, ...]:
        """Parameter-group rows that define the method ("REGEX -> frozen", "REGEX -> lr=F"; see
        `medvlp_jax.optim`), placed before `config.optim.groups`. Default: none."""
        return ()

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

    def feature_pyramid(self, variables: dict, batch: Batch) -> tuple[jax.Array, ...]:
        """The image encoder's feature maps for dense heads (segmentation, detection):
        `[B, h_i, w_i, C_i]`, fine to coarse (batch: `image` and hook fields)."""
        raise NotImplementedError

    def predict_fns(self) -> dict[str, Callable[[dict, Batch], jax.Array]]:
        """The named `(variables, batch) -> array` functions evaluators may use
        (`config.evals.<name>.pred`; see `medvlp_jax.evaluation`). Names and shapes:

        - `embed_image`: `[B, D]` image embeddings (batch: `image`).
        - `embed_text`: `[B, D]` text embeddings (batch: `input_ids`, `attention_mask`, hook
          fields).
        - `pair_score`: `[B]` match score of row i's image with row i's text, higher = better
          (fusion models: image-text matching; the batch has both sides of each pair).
        - `feature_map`: `[B, N, D]` image features (N regions/patches).
        - `feature_pyramid`: a tuple of `[B, h_i, w_i, C_i]` image feature maps, fine to
          coarse (ResNet stages; a ViT's patch tokens as a grid), for the downstream dense
          heads (`medvlp_jax.downstream`).

        Default: `embed_image` / `embed_text` / `feature_pyramid` for the `embed_images` /
        `embed_texts` / `feature_pyramid` this method implements. Methods with more override
        this and extend the dict.
        """
        own = {
            "embed_image": "embed_images",
            "embed_text": "embed_texts",
            "feature_pyramid": "feature_pyramid",
        }
        return {
            name: getattr(self, attr)
            for name, attr in own.items()
            if getattr(type(self), attr) is not getattr(Method, attr)
        }


def image_tower_pyramid(model: nn.Module, variables: dict, batch: Batch) -> tuple[jax.Array, ...]:
    """`Method.feature_pyramid` of a model whose image tower is its `image` submodule: the
    tower's `pyramid` output (running batch-norm statistics, no dropout)."""
    return model.apply(variables, batch["image"], method=lambda m, x: m.image(x)["pyramid"])


def get_method(config: ml_collections.ConfigDict) -> Method:
    """Instantiates the method named by `config.method` on `precision.resolve(config)` (tower
    dtypes made concrete from `train.compute_dtype`); `config` itself is not modified."""
    if config.method not in REGISTRY:
        raise ValueError(f"config.method={config.method!r}; known methods: {sorted(REGISTRY)}")
    module_name, _, class_name = REGISTRY[config.method].partition(":")
    method_cls = getattr(importlib.import_module(module_name), class_name)
    return method_cls(precision.resolve(config))
