"""Name maps between Hugging Face / torchvision checkpoints and our modules (`TensorMap`s).

Image stems (ResNet conv1, ViT patch embeddings) load into one-channel modules by summing
the checkpoint's RGB kernels over their input channels.

Each function returns the maps for one module; `prefix` is the checkpoint name prefix and
`path` the Flax path prefix (e.g. ('vision',) inside a CLIPModel).
"""

from __future__ import annotations

from medvlp_jax.models.bert import BertEncoder
from medvlp_jax.models.clip import CLIPModel
from medvlp_jax.models.clip_text import CLIPTextEncoder
from medvlp_jax.models.convert.tensors import TensorMap
from medvlp_jax.models.resnet import STAGES, ResNet50
from medvlp_jax.models.vit import VisionTransformer

Path = tuple[str, ...]

# Per-layer checkpoint names: attention q/k/v/out, the two norms, the two MLP linears.
_LAYER_NAMES = {
    "bert": dict(
        q="attention.self.query",
        k="attention.self.key",
        v="attention.self.value",
        o="attention.output.dense",
        attn_norm="attention.output.LayerNorm",
        fc1="intermediate.dense",
        fc2="output.dense",
        mlp_norm="output.LayerNorm",
        layers="encoder.layer",
    ),
    "vit": dict(
        q="attention.attention.query",
        k="attention.attention.key",
        v="attention.attention.value",
        o="attention.output.dense",
        attn_norm="layernorm_before",
        fc1="intermediate.dense",
        fc2="output.dense",
        mlp_norm="layernorm_after",
        layers="encoder.layer",
    ),
    "clip": dict(
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        attn_norm="layer_norm1",
        fc1="mlp.fc1",
        fc2="mlp.fc2",
        mlp_norm="layer_norm2",
        layers="encoder.layers",
    ),
}


def linear(name: str, path: Path, bias: bool = True) -> list[TensorMap]:
    maps = [TensorMap(f"{name}.weight", (*path, "kernel"), "linear")]
    return maps + ([TensorMap(f"{name}.bias", (*path, "bias"))] if bias else [])


def norm(name: str, path: Path) -> list[TensorMap]:
    return [
        TensorMap(f"{name}.weight", (*path, "scale")),
        TensorMap(f"{name}.bias", (*path, "bias")),
    ]


def embed(name: str, path: Path) -> list[TensorMap]:
    return [TensorMap(f"{name}.weight", (*path, "embedding"))]


def transformer_layers(
    style: str, num_layers: int, prefix: str, path: Path, qkv_bias: bool = True
) -> list[TensorMap]:
    """Maps of a TransformerStack at `path` (its layer_i params) for a checkpoint `style`."""
    n = _LAYER_NAMES[style]
    maps = []
    for i in range(num_layers):
        hf, fx = f"{prefix}{n['layers']}.{i}.", (*path, f"layer_{i}")
        for key, param in (("q", "query"), ("k", "key"), ("v", "value")):
            maps.append(
                TensorMap(f"{hf}{n[key]}.weight", (*fx, "attn", param, "kernel"), "heads_in")
            )
            if qkv_bias:
                maps.append(
                    TensorMap(f"{hf}{n[key]}.bias", (*fx, "attn", param, "bias"), "heads_bias")
                )
        maps.append(TensorMap(f"{hf}{n['o']}.weight", (*fx, "attn", "out", "kernel"), "heads_out"))
        maps.append(TensorMap(f"{hf}{n['o']}.bias", (*fx, "attn", "out", "bias")))
        maps += norm(f"{hf}{n['attn_norm']}", (*fx, "attn_norm"))
        maps += linear(f"{hf}{n['fc1']}", (*fx, "mlp", "fc1"))
        maps += linear(f"{hf}{n['fc2']}", (*fx, "mlp", "fc2"))
        maps += norm(f"{hf}{n['mlp_norm']}", (*fx, "mlp_norm"))
    return maps


def bert_maps(module: BertEncoder, prefix: str = "", path: Path = ()) -> list[TensorMap]:
    """BertModel / RobertaModel names."""
    e = f"{prefix}embeddings."
    maps = (
        embed(f"{e}word_embeddings", (*path, "word_embeddings"))
        + embed(f"{e}position_embeddings", (*path, "position_embeddings"))
        + embed(f"{e}token_type_embeddings", (*path, "token_type_embeddings"))
        + norm(f"{e}LayerNorm", (*path, "embed_norm"))
    )
    t = module.transformer
    maps += transformer_layers("bert", t.num_layers, prefix, (*path, "encoder"), t.qkv_bias)
    if module.pooler:
        maps += linear(f"{prefix}pooler.dense", (*path, "pooler_dense"))
    return maps


def vit_hf_maps(module: VisionTransformer, prefix: str = "", path: Path = ()) -> list[TensorMap]:
    """ViTModel names."""
    e = f"{prefix}embeddings."
    maps = [
        TensorMap(f"{e}cls_token", (*path, "cls"), "lead2"),
        TensorMap(f"{e}position_embeddings", (*path, "posemb"), "lead1", resize=True),
        TensorMap(
            f"{e}patch_embeddings.projection.weight",
            (*path, "patch_embed", "kernel"),
            "conv",
            sum_rgb=True,
        ),
        TensorMap(f"{e}patch_embeddings.projection.bias", (*path, "patch_embed", "bias")),
    ]
    t = module.transformer
    maps += transformer_layers("vit", t.num_layers, prefix, (*path, "encoder"), t.qkv_bias)
    maps += norm(f"{prefix}layernorm", (*path, "norm"))
    if module.pooler:
        maps += linear(f"{prefix}pooler.dense", (*path, "pooler_dense"))
    return maps


def vit_clip_maps(
    module: VisionTransformer,
    prefix: str = "vision_model.",
    path: Path = (),
    proj_name: str = "visual_projection.weight",
) -> list[TensorMap]:
    """CLIPVisionModel names (+ the CLIPModel / WithProjection `visual_projection`)."""
    e = f"{prefix}embeddings."
    maps = [
        TensorMap(f"{e}class_embedding", (*path, "cls")),
        TensorMap(
            f"{e}patch_embedding.weight", (*path, "patch_embed", "kernel"), "conv", sum_rgb=True
        ),
        TensorMap(f"{e}position_embedding.weight", (*path, "posemb"), resize=True),
    ]
    maps += norm(f"{prefix}pre_layrnorm", (*path, "ln_pre"))
    t = module.transformer
    maps += transformer_layers("clip", t.num_layers, prefix, (*path, "encoder"), t.qkv_bias)
    maps += norm(f"{prefix}post_layernorm", (*path, "norm"))
    if module.proj_dim:
        maps.append(TensorMap(proj_name, (*path, "proj", "kernel"), "linear"))
    return maps


def clip_text_maps(
    module: CLIPTextEncoder,
    prefix: str = "text_model.",
    path: Path = (),
    proj_name: str = "text_projection.weight",
) -> list[TensorMap]:
    """CLIPTextModel names (+ the CLIPModel / WithProjection `text_projection`)."""
    e = f"{prefix}embeddings."
    maps = embed(f"{e}token_embedding", (*path, "token_embedding"))
    maps.append(TensorMap(f"{e}position_embedding.weight", (*path, "posemb")))
    t = module.transformer
    maps += transformer_layers("clip", t.num_layers, prefix, (*path, "encoder"), t.qkv_bias)
    maps += norm(f"{prefix}final_layer_norm", (*path, "final_norm"))
    if module.proj_dim:
        maps.append(TensorMap(proj_name, (*path, "proj", "kernel"), "linear"))
    return maps


def clip_maps(module: CLIPModel) -> list[TensorMap]:
    """CLIPModel names."""
    return (
        vit_clip_maps(module.vision, "vision_model.", ("vision",))
        + clip_text_maps(module.text, "text_model.", ("text",))
        + [TensorMap("logit_scale", ("logit_scale",))]
    )


def _bn(name: str, path: Path) -> list[TensorMap]:
    return [
        TensorMap(f"{name}.weight", (*path, "scale")),
        TensorMap(f"{name}.bias", (*path, "bias")),
        TensorMap(f"{name}.running_mean", (*path, "mean"), collection="batch_stats"),
        TensorMap(f"{name}.running_var", (*path, "var"), collection="batch_stats"),
    ]


def resnet50_maps(module: ResNet50, prefix: str = "", path: Path = ()) -> list[TensorMap]:
    """torchvision resnet50 state-dict names (without `fc`)."""
    del module  # one fixed layout
    maps = [TensorMap(f"{prefix}conv1.weight", (*path, "conv1", "kernel"), "conv", sum_rgb=True)]
    maps += _bn(f"{prefix}bn1", (*path, "bn1"))
    for stage, _, blocks, _ in STAGES:
        for j in range(blocks):
            tv, fx = f"{prefix}{stage}.{j}.", (*path, f"{stage}_{j}")
            for k in (1, 2, 3):
                maps.append(TensorMap(f"{tv}conv{k}.weight", (*fx, f"conv{k}", "kernel"), "conv"))
                maps += _bn(f"{tv}bn{k}", (*fx, f"bn{k}"))
            if j == 0:
                maps.append(
                    TensorMap(
                        f"{tv}downsample.0.weight", (*fx, "downsample_conv", "kernel"), "conv"
                    )
                )
                maps += _bn(f"{tv}downsample.1", (*fx, "downsample_bn"))
    return maps
