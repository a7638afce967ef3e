"""Build towers from an `ml_collections.ConfigDict` (`name` + size fields) and size presets.

`tower_config(name, size)` returns a complete config (every field the tower reads, with the
preset's values); `build_image_tower(cfg)` / `build_text_tower(cfg)` build the Linen module.
Unknown fields are an error naming the field and the valid ones.

Image towers: 'vit' (layout 'clip' | 'hf'), 'resnet50'. Text towers: 'bert', 'roberta',
'clip_text'. Sizes: 'tiny' (tests), 'small', 'base'; plus 'minilm' for 'bert'
(all-MiniLM-L6-v2's shape).

Dtypes: `param_dtype` 'float32' (default) or 'bfloat16'; `dtype` (compute) '' (`FOLLOW`, the
default: follow the run's `train.compute_dtype`, see `medvlp_jax.precision`; float32 when a
tower is built from an unresolved config), 'float32' or 'bfloat16' (explicit: kept).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from medvlp_jax.models.batch_norm import BatchNormMode
from medvlp_jax.models.bert import BertEncoder
from medvlp_jax.models.clip_text import CLIPTextEncoder
from medvlp_jax.models.resnet import ResNet50
from medvlp_jax.models.transformer import TransformerConfig
from medvlp_jax.models.vit import VisionTransformer

IMAGE_TOWERS = ("vit", "resnet50")
TEXT_TOWERS = ("bert", "roberta", "clip_text")
TOWER_NAMES = IMAGE_TOWERS + TEXT_TOWERS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# A tower `dtype` of FOLLOW computes in `train.compute_dtype` (`precision.resolve`).
FOLLOW = ""

# Fields every transformer tower has.
_TRANSFORMER = dict(
    width=32,
    num_layers=2,
    num_heads=4,
    mlp_dim=64,
    activation="gelu",
    layer_norm_eps=1e-5,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    remat=False,
    scan=False,
    fused_qkv=False,
    dtype=FOLLOW,
    param_dtype="float32",
)
# Fields of towers with batch norms: `bn_stats` 'global' | 'per_device' (statistics within
# each device's batch shard, as DDP without SyncBatchNorm) and `bn_unbiased_running_var`
# (PyTorch's running variance); see medvlp_jax/models/batch_norm.py.
BATCH_NORM_FIELDS = dict(bn_stats="global", bn_unbiased_running_var=False)
_DEFAULTS: dict[str, dict] = {
    "vit": dict(
        _TRANSFORMER,
        image_size=32,
        patch_size=8,
        channels=3,
        layout="clip",
        proj_dim=0,
        pooler=False,
        stem="patch",
        activation="quick_gelu",
        **BATCH_NORM_FIELDS,  # the 'resnet' stem's
    ),
    "resnet50": dict(channels=3, dtype=FOLLOW, param_dtype="float32", **BATCH_NORM_FIELDS),
    "bert": dict(
        _TRANSFORMER,
        vocab_size=30522,
        max_len=512,
        type_vocab_size=2,
        pad_token_id=0,
        pooler=True,
        layer_norm_eps=1e-12,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
    ),
    "clip_text": dict(
        _TRANSFORMER,
        vocab_size=49408,
        max_len=77,
        proj_dim=0,
        eos_token_id=49407,
        activation="quick_gelu",
    ),
}
_DEFAULTS["roberta"] = dict(_DEFAULTS["bert"], vocab_size=50265, max_len=514, pad_token_id=1)
_DEFAULTS["roberta"]["type_vocab_size"] = 1

_SIZES: dict[str, dict] = {
    "tiny": dict(width=32, num_layers=2, num_heads=4, mlp_dim=64),
    "small": dict(width=384, num_layers=6, num_heads=6, mlp_dim=1536),
    "base": dict(width=768, num_layers=12, num_heads=12, mlp_dim=3072),
}
_PRESETS: dict[tuple[str, str], dict] = {
    ("vit", "tiny"): dict(image_size=32, patch_size=8, proj_dim=16),
    ("vit", "small"): dict(image_size=224, patch_size=16, proj_dim=256),
    ("vit", "base"): dict(image_size=224, patch_size=16, proj_dim=512),
    ("bert", "tiny"): dict(vocab_size=100, max_len=64),
    ("bert", "minilm"): dict(width=384, num_layers=6, num_heads=12, mlp_dim=1536),
    ("roberta", "tiny"): dict(vocab_size=100, max_len=66),
    ("clip_text", "tiny"): dict(vocab_size=100, max_len=16, proj_dim=16, eos_token_id=2),
    ("clip_text", "base"): dict(width=512, num_heads=8, mlp_dim=2048, proj_dim=512),
}


def tower_config(name: str, size: str = "tiny") -> ml_collections.ConfigDict:
    """A complete tower config: `name`, then every field with the preset `size`'s values."""
    if name not in _DEFAULTS:
        raise ValueError(f"unknown tower {name!r}; choose one of {sorted(_DEFAULTS)}")
    fields = dict(_DEFAULTS[name])
    if name != "resnet50":
        if size not in _SIZES and (name, size) not in _PRESETS:
            raise ValueError(f"unknown size {size!r} for tower {name!r}")
        fields.update(_SIZES.get(size, {}))
        fields.update(_PRESETS.get((name, size), {}))
    return ml_collections.ConfigDict(dict(name=name, **fields))


def _fields(cfg: ml_collections.ConfigDict, allowed: tuple[str, ...]) -> dict:
    """cfg merged over the defaults of its tower; unknown fields raise naming them."""
    name = cfg.get("name")
    if name not in allowed:
        raise ValueError(f"tower name {name!r} is not one of {allowed}")
    given = dict(cfg.items())
    given.pop("name")
    unknown = sorted(set(given) - set(_DEFAULTS[name]))
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown} for tower {name!r}; "
            f"valid fields: {sorted(_DEFAULTS[name])}"
        )
    return dict(_DEFAULTS[name], **given, name=name)


def _dtype(f: dict, key: str):
    """The jnp dtype of field `key` ('dtype' or 'param_dtype'); an unresolved FOLLOW compute
    dtype is float32."""
    if key == "dtype" and f[key] == FOLLOW:
        return jnp.float32
    if f[key] not in DTYPES:
        follow = " or '' (follow train.compute_dtype)" if key == "dtype" else ""
        raise ValueError(f"{key} {f[key]!r} is not one of {sorted(DTYPES)}{follow}")
    return DTYPES[f[key]]


def _transformer(f: dict, *, norm_first: bool) -> TransformerConfig:
    return TransformerConfig(
        width=f["width"],
        num_layers=f["num_layers"],
        num_heads=f["num_heads"],
        mlp_dim=f["mlp_dim"],
        norm_first=norm_first,
        activation=f["activation"],
        layer_norm_eps=f["layer_norm_eps"],
        dropout_rate=f["dropout_rate"],
        attention_dropout_rate=f["attention_dropout_rate"],
        remat=f["remat"],
        scan=f["scan"],
        fused_qkv=f["fused_qkv"],
        dtype=_dtype(f, "dtype"),
        param_dtype=_dtype(f, "param_dtype"),
    )


def build_image_tower(cfg: ml_collections.ConfigDict):
    """VisionTransformer or ResNet50 from `cfg` (see `tower_config('vit')` for the fields)."""
    f = _fields(cfg, IMAGE_TOWERS)
    if f["name"] == "resnet50":
        return ResNet50(
            channels=f["channels"],
            dtype=_dtype(f, "dtype"),
            param_dtype=_dtype(f, "param_dtype"),
            bn=_bn_mode(f),
        )
    return VisionTransformer(
        _transformer(f, norm_first=True),
        image_size=f["image_size"],
        patch_size=f["patch_size"],
        channels=f["channels"],
        layout=f["layout"],
        proj_dim=f["proj_dim"] or None,
        pooler=f["pooler"],
        stem=f["stem"],
        bn=_bn_mode(f),
    )


def _bn_mode(f: dict) -> BatchNormMode:
    try:
        return BatchNormMode(f["bn_stats"], bool(f["bn_unbiased_running_var"]))
    except ValueError as e:
        raise ValueError(f"tower {f['name']!r} field bn_stats: {e}") from None


def build_text_tower(cfg: ml_collections.ConfigDict):
    """BertEncoder ('bert' / 'roberta') or CLIPTextEncoder ('clip_text') from `cfg`."""
    f = _fields(cfg, TEXT_TOWERS)
    if f["name"] == "clip_text":
        return CLIPTextEncoder(
            _transformer(f, norm_first=True),
            vocab_size=f["vocab_size"],
            max_len=f["max_len"],
            proj_dim=f["proj_dim"] or None,
            eos_token_id=f["eos_token_id"],
        )
    return BertEncoder(
        _transformer(f, norm_first=False),
        vocab_size=f["vocab_size"],
        max_position_embeddings=f["max_len"],
        type_vocab_size=f["type_vocab_size"],
        pad_token_id=f["pad_token_id"],
        position_style="roberta" if f["name"] == "roberta" else "absolute",
        pooler=f["pooler"],
    )
