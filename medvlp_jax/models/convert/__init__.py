"""Checkpoint import/export: Hugging Face folders and torchvision ResNet-50 state dicts."""

from medvlp_jax.models.convert.hf import (
    default_text_tower_path,
    export_hf,
    load_default_text_tower,
    load_hf,
    load_hf_params,
)
from medvlp_jax.models.convert.tensors import CheckpointError
from medvlp_jax.models.convert.torchvision import (
    export_torchvision_resnet50,
    load_torchvision_resnet50,
)

__all__ = [
    "CheckpointError",
    "default_text_tower_path",
    "export_hf",
    "export_torchvision_resnet50",
    "load_default_text_tower",
    "load_hf",
    "load_hf_params",
    "load_torchvision_resnet50",
]
