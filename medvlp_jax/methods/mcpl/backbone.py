"""Where MCPL's frozen CLIP-style backbone comes from (`config.init.backbone`).

- '' (default): the SynthCXR CLIP baseline that `config.backbone` describes (a full
  configs/clip.py run config). Its run lives in `<cache>/backbones/clip-<hash>` (`default_dir`:
  the hash covers what decides the weights); when that run has not finished,
  `ensure` trains it there first with `train.run(config.backbone, folder)`, the very code path
  of a user running configs/clip.py (an interrupted pre-training resumes).
- A Hugging Face CLIP folder (`config.json` with model_type 'clip' + `model.safetensors`, e.g.
  openai/clip-vit-base-patch16): CLIP ViT + causal text towers built from its config, weights
  through `models.convert.load_hf_params`; the towers carry CLIP's own projections, so the
  two-tower projections are identities and text pooling is the EOT token ('pooled').
- A medvlp_jax work directory of a CLIP run (`config.json` with "method": "clip" and
  `checkpoints/`): towers from its config, weights from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np

from medvlp_jax import checkpointing
from medvlp_jax import config as config_lib
from medvlp_jax.data.config import resolve_cache_dir
from medvlp_jax.models.builders import build_image_tower, build_text_tower, tower_config
from medvlp_jax.models.convert import hf

_DATA_LOCATION = ("cache_dir", "num_workers", "prefetch")  # where data lives, how it loads


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """The backbone's architecture (as `TwoTower` takes it) and where its weights are.

    kind: 'checkpoint' (a medvlp_jax CLIP run folder) or 'hf_clip'.
    """

    image: ml_collections.FrozenConfigDict
    text: ml_collections.FrozenConfigDict
    embed_dim: int
    text_pooling: str
    kind: str
    path: Path


def _from_run_config(run_cfg: ml_collections.ConfigDict, path: Path) -> BackboneSpec:
    m = run_cfg.model
    if m.image.name != "vit" or m.image.layout != "clip":
        raise ValueError(
            f"MCPL needs a CLIP-layout ViT image tower; the backbone at {path} has "
            f"{m.image.name} (layout {m.image.get('layout')})"
        )
    return BackboneSpec(
        ml_collections.FrozenConfigDict(m.image),
        ml_collections.FrozenConfigDict(m.text),
        m.embed_dim,
        m.text_pooling,
        "checkpoint",
        path,
    )


def default_dir(config: ml_collections.ConfigDict) -> Path:
    """`<cache>/backbones/clip-<hash>`: sha1 over what decides the pre-trained weights in
    `config.backbone` (method, seed, model, optim, train.num_steps and data, less where the
    data lives and how it is loaded); evaluation, logging and checkpoint settings do not count.
    """
    run = config.backbone.to_dict()
    key = {
        **{name: run[name] for name in ("method", "seed", "model", "optim")},
        "num_steps": run["train"]["num_steps"],
        "data": {
            k: v
            for k, v in run["data"].items()
            if k not in ("cache_dir", "num_workers", "prefetch")
        },
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return resolve_cache_dir(config.data.cache_dir) / "backbones" / f"clip-{digest[:12]}"


def _hf_clip(folder: Path, data_cfg) -> BackboneSpec:
    cfg = hf.read_config(folder)
    if cfg["model_type"] != "clip":
        raise ValueError(
            f"--config.init.backbone={folder}: a CLIPModel folder is needed (model_type 'clip'), "
            f"found {cfg['model_type']!r}"
        )
    clip = hf.module_from_config(cfg, {"visual_projection.weight", "text_projection.weight"})
    vision, text = clip.vision, clip.text

    def transformer(t) -> dict:
        return dict(
            width=t.width,
            num_layers=t.num_layers,
            num_heads=t.num_heads,
            mlp_dim=t.mlp_dim,
            activation=t.activation,
            layer_norm_eps=t.layer_norm_eps,
        )

    image = tower_config("vit", "tiny")
    image.update(
        **transformer(vision.transformer),
        image_size=data_cfg.image_size,  # the positional grid is resized on load if needed
        patch_size=vision.patch_size,
        channels=data_cfg.channels,
        layout="clip",
        proj_dim=vision.proj_dim,
    )
    text_cfg = tower_config("clip_text", "tiny")
    text_cfg.update(
        **transformer(text.transformer),
        vocab_size=text.vocab_size,
        max_len=text.max_len,
        proj_dim=text.proj_dim,
        eos_token_id=text.eos_token_id,
    )
    return BackboneSpec(
        ml_collections.FrozenConfigDict(image),
        ml_collections.FrozenConfigDict(text_cfg),
        vision.proj_dim,
        "pooled",
        "hf_clip",
        folder,
    )


def describe(config: ml_collections.ConfigDict) -> BackboneSpec:
    """The backbone of `config` (reads only small config files; trains nothing)."""
    source = config.init.backbone
    if not source:
        return _from_run_config(config.backbone, default_dir(config))
    folder = Path(source).expanduser()
    meta = folder / "config.json"
    if not meta.is_file():
        raise FileNotFoundError(
            f"--config.init.backbone={source}: expected a Hugging Face CLIP folder or a "
            "medvlp_jax CLIP work directory, with a config.json"
        )
    if "model_type" in json.loads(meta.read_text()):
        if not config.data.tokenizer:
            raise ValueError(
                f"--config.init.backbone={source} is a Hugging Face CLIP model: set "
                f"--config.data.tokenizer={source} too (its tokenizer, not the MiniLM default)"
            )
        return _hf_clip(folder, config.data)
    run_cfg = config_lib.from_json(meta.read_text())
    if run_cfg.get("method") != "clip":
        raise ValueError(
            f"--config.init.backbone={source}: a CLIP run is needed, found method "
            f"{run_cfg.get('method')!r}"
        )
    return _from_run_config(run_cfg, folder)


def _finished(config: ml_collections.ConfigDict, spec: BackboneSpec) -> bool:
    """Whether the default backbone's run has its final checkpoint."""
    return (spec.path / "checkpoints" / str(config.backbone.train.num_steps)).is_dir()


def ensure(config: ml_collections.ConfigDict, spec: BackboneSpec) -> None:
    """Pre-trains the default backbone into its cache folder unless that run has finished
    (reached `config.backbone.train.num_steps`); an interrupted run resumes."""
    if config.init.backbone or _finished(config, spec):
        return
    from medvlp_jax import train  # the trainer imports the methods' registry

    run_cfg = ml_collections.ConfigDict(config.backbone.to_dict())
    run_cfg.data.cache_dir = config.data.cache_dir
    print(
        f"MCPL: no pre-trained CLIP backbone in the cache ({spec.path}); pre-training it first "
        "with the CLIP baseline (config.backbone, as configs/clip.py), then tuning prompts",
        flush=True,
    )
    spec.path.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (spec.path / "config.json").write_text(config_lib.to_json(run_cfg))
    train.run(run_cfg, spec.path)
    if not _finished(config, spec):
        raise RuntimeError(
            f"MCPL: the backbone pre-training in {spec.path} stopped before step "
            f"{run_cfg.train.num_steps}; run again to resume it"
        )
    print(f"MCPL: backbone ready in {spec.path}", flush=True)


def load(spec: BackboneSpec, variables: dict) -> dict:
    """Backbone (`TwoTower`) variables ({'params'[, 'batch_stats']}) with the pre-trained
    weights, and running statistics of batch-norm towers, of `spec` (host arrays)."""
    if spec.kind == "checkpoint":
        return checkpointing.load_variables(str(spec.path), variables)
    loaded = dict(variables["params"])
    loaded["image"] = hf.load_hf_params(spec.path, build_image_tower(spec.image))["params"]
    loaded["text"] = hf.load_hf_params(spec.path, build_text_tower(spec.text))["params"]
    for name in ("image_proj", "text_proj"):
        loaded[name] = {"kernel": np.eye(spec.embed_dim, dtype=np.float32)}
    return {**variables, "params": loaded}
