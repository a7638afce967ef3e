"""Importers of pre-trained tower weights from foreign checkpoints (`medvlp_jax.weights`).

Sources: 'minilm' (text only: the packaged all-MiniLM-L6-v2), a Hugging Face folder (BERT,
RoBERTa, ViT, CLIP), or for a ResNet-50 image tower a torchvision state dict saved as
`.safetensors`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_collections

from medvlp_jax.models.builders import build_image_tower, build_text_tower
from medvlp_jax.models.convert import (
    default_text_tower_path,
    load_hf_params,
    load_torchvision_resnet50,
)


def _tower_variables(tower, source: str) -> dict:
    if source == "minilm":
        source = default_text_tower_path()
    if source.endswith(".safetensors"):
        return load_torchvision_resnet50(source, channels=tower.channels, module=tower)[1]
    if not Path(source).is_dir():
        raise FileNotFoundError(f"pre-trained weights {source!r}: no such folder or .safetensors")
    return load_hf_params(source, tower)


def tower_importer(tower) -> Callable[[str], dict]:
    """`source -> variables` of `tower` (a module you built) from a foreign checkpoint."""
    return lambda source: _tower_variables(tower, source)


def two_tower_importers(model_cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """Importers (see `Method.importers`) of the `image` and `text` towers that
    `model_cfg.image` / `model_cfg.text` describe, at `<prefix>image` / `<prefix>text`."""
    return {
        f"{prefix}image": tower_importer(build_image_tower(model_cfg.image)),
        f"{prefix}text": tower_importer(build_text_tower(model_cfg.text)),
    }
