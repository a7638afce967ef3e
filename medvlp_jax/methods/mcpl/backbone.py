"""Where MCPL's frozen CLIP-style backbone comes from (`config.init.backbone.source`).

- 'run:backbone' (default): the SynthCXR CLIP baseline that `config.prerequisites.backbone`
  describes (a full configs/clip.py run config). The trainer trains it into the cache before
  MCPL starts (`medvlp_jax.prerequisites`: the code path of `main`, so an interrupted
  pre-training resumes) and the load reads its latest checkpoint into `params/backbone`.
- A Hugging Face CLIP folder (`config.json` with model_type 'clip' + `model.safetensors`, e.g.
  openai/clip-vit-base-patch16): CLIP ViT + causal text towers built from its config, weights
  through `models.convert.load_hf_params` (`importer`); the towers carry CLIP's own
  projections, so the two-tower projections are identities and text pooling is the EOT token
  ('pooled').
- A medvlp_jax work directory of a CLIP run (`config.json` with "method": "clip" and
  `checkpoints/`): towers from its config, weights from its latest checkpoint.
- '': the architecture of `config.prerequisites.backbone`, randomly initialised (tests).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
import numpy as np

from medvlp_jax import config as config_lib
from medvlp_jax import prerequisites
from medvlp_jax.models.builders import build_image_tower, build_text_tower, tower_config
from medvlp_jax.models.convert import hf
from medvlp_jax.weights import RUN_PREFIX


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


def _hf_clip(folder: Path, data_cfg) -> BackboneSpec:
    cfg = hf.read_config(folder)
    if cfg["model_type"] != "clip":
        raise ValueError(
            f"--config.init.backbone.source={folder}: a CLIPModel folder is needed "
            f"(model_type 'clip'), found {cfg['model_type']!r}"
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
    source = config.init.backbone.source
    if not source or source.startswith(RUN_PREFIX):
        # '' loads nothing (a random backbone) with the architecture of the default one.
        name = source[len(RUN_PREFIX) :] or "backbone"
        run_cfg = prerequisites.run_config(config, name)
        return _from_run_config(run_cfg, prerequisites.run_dir(config, name))
    folder = Path(source).expanduser()
    meta = folder / "config.json"
    if not meta.is_file():
        raise FileNotFoundError(
            f"--config.init.backbone.source={source}: expected 'run:<prerequisite>', a Hugging "
            "Face CLIP folder or a medvlp_jax CLIP work directory, with a config.json"
        )
    if "model_type" in json.loads(meta.read_text()):
        if not config.data.tokenizer:
            raise ValueError(
                f"--config.init.backbone.source={source} is a Hugging Face CLIP model: set "
                f"--config.data.tokenizer={source} too (its tokenizer, not the MiniLM default)"
            )
        return _hf_clip(folder, config.data)
    run_cfg = config_lib.from_json(meta.read_text())
    if run_cfg.get("method") != "clip":
        raise ValueError(
            f"--config.init.backbone.source={source}: a CLIP run is needed, found method "
            f"{run_cfg.get('method')!r}"
        )
    return _from_run_config(run_cfg, folder)


def import_hf_clip(spec: BackboneSpec, folder: str) -> dict:
    """Backbone (`TwoTower`) params from a Hugging Face CLIP folder: its towers, identity
    projections (the towers carry CLIP's own) and its logit scale; host arrays."""
    if spec.kind != "hf_clip" or Path(folder) != spec.path:
        raise ValueError(
            f"the MCPL backbone was described from {spec.path}, not the CLIP folder {folder}"
        )
    params = {
        "image": hf.load_hf_params(folder, build_image_tower(spec.image))["params"],
        "text": hf.load_hf_params(folder, build_text_tower(spec.text))["params"],
    }
    for name in ("image_proj", "text_proj"):
        params[name] = {"kernel": np.eye(spec.embed_dim, dtype=np.float32)}
    tensors, _ = hf.read_tensors(folder)
    params["log_scale"] = np.asarray(tensors["logit_scale"], np.float32).reshape(())
    return {"params": params}
