"""Encoders, shared blocks and checkpoint converters (Flax Linen, logically partitioned).

Towers take NHWC images [B, H, W, C] or input_ids / attention_mask [B, T] and return a dict
with at least `tokens` [B, N, D] and `pooled` [B, D] (see each module's docstring).
"""

from medvlp_jax.models.bert import BertEncoder
from medvlp_jax.models.builders import build_image_tower, build_text_tower, tower_config
from medvlp_jax.models.clip import CLIPModel
from medvlp_jax.models.clip_text import CLIPTextEncoder
from medvlp_jax.models.convert import (
    CheckpointError,
    default_text_tower_path,
    export_hf,
    export_torchvision_resnet50,
    load_default_text_tower,
    load_hf,
    load_hf_params,
    load_torchvision_resnet50,
)
from medvlp_jax.models.fusion import CoAttentionFusion, CoAttentionLayer
from medvlp_jax.models.heads import (
    AttentionPool,
    MLMHead,
    MLPHead,
    masked_mean,
    sentence_embedding,
)
from medvlp_jax.models.resnet import ResNet50
from medvlp_jax.models.transformer import (
    LayerPrompts,
    TransformerConfig,
    TransformerLayer,
    TransformerStack,
)
from medvlp_jax.models.vit import VisionTransformer, resize_posemb

__all__ = [
    "AttentionPool",
    "BertEncoder",
    "CLIPModel",
    "CLIPTextEncoder",
    "CheckpointError",
    "CoAttentionFusion",
    "CoAttentionLayer",
    "LayerPrompts",
    "MLMHead",
    "MLPHead",
    "ResNet50",
    "TransformerConfig",
    "TransformerLayer",
    "TransformerStack",
    "VisionTransformer",
    "build_image_tower",
    "build_text_tower",
    "default_text_tower_path",
    "export_hf",
    "export_torchvision_resnet50",
    "load_default_text_tower",
    "load_hf",
    "load_hf_params",
    "load_torchvision_resnet50",
    "masked_mean",
    "resize_posemb",
    "sentence_embedding",
    "tower_config",
]
