"""Put pre-trained tower weights into a freshly initialised two-tower variables dict.

`text_init` / `image_init` values: '' (keep the random init), 'minilm' (text only: the packaged
all-MiniLM-L6-v2), a Hugging Face folder (BERT, RoBERTa, ViT, CLIP), or for a ResNet-50 image
tower a torchvision state dict saved as `.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
from absl import logging

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


def _replace(variables: dict, name: str, loaded: dict) -> dict:
    out = {collection: dict(tree) for collection, tree in variables.items()}
    for collection, tree in loaded.items():
        out.setdefault(collection, {})[name] = tree
    return out


def load_towers(variables: dict, model_cfg: ml_collections.ConfigDict) -> dict:
    """Returns `variables` with `params/image` and `params/text` (and the image tower's
    `batch_stats`) replaced by `model_cfg.image_init` / `model_cfg.text_init` weights."""
    if model_cfg.image_init:
        tower = build_image_tower(model_cfg.image)
        variables = _replace(variables, "image", _tower_variables(tower, model_cfg.image_init))
        logging.info("image tower initialised from %s", model_cfg.image_init)
    if model_cfg.text_init:
        tower = build_text_tower(model_cfg.text)
        variables = _replace(variables, "text", _tower_variables(tower, model_cfg.text_init))
        logging.info("text tower initialised from %s", model_cfg.text_init)
    return variables
