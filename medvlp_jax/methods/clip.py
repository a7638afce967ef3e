"""CLIP / ConVIRT baseline: a two-tower model trained with global-batch InfoNCE (or SigLIP).

Config (`config.model`): `image`, `text` (tower configs), `embed_dim`, `text_pooling`,
`loss` ('clip' | 'siglip'), `learn_temperature`, `temperature` (used when fixed),
`memory_light` (shard_map loss that never builds the full [B, B] logits on one device).
Pre-trained towers come through `config.init` loads into 'image' / 'text' (`importers`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from medvlp_jax import precision
from medvlp_jax.losses.contrastive import (
    CLIP_LOG_SCALE_INIT,
    SIGLIP_BIAS_INIT,
    SIGLIP_LOG_SCALE_INIT,
    clip_loss,
    logit_scale,
    sharded_clip_loss,
    sharded_siglip_loss,
    siglip_loss,
)
from medvlp_jax.methods.base import Method, SetupContext, image_tower_pyramid
from medvlp_jax.models import pretrained
from medvlp_jax.models.two_tower import TwoTower

LOSSES = ("clip", "siglip")


def build_two_tower(model_cfg: ml_collections.ConfigDict, dtype=jnp.float32) -> TwoTower:
    """The TwoTower module described by `config.model`, its projections computing in `dtype`."""
    if model_cfg.loss not in LOSSES:
        raise ValueError(f"config.model.loss={model_cfg.loss!r}; expected one of {LOSSES}")
    siglip = model_cfg.loss == "siglip"
    return TwoTower(
        image_cfg=ml_collections.FrozenConfigDict(model_cfg.image),
        text_cfg=ml_collections.FrozenConfigDict(model_cfg.text),
        embed_dim=model_cfg.embed_dim,
        text_pooling=model_cfg.text_pooling,
        log_scale_init=SIGLIP_LOG_SCALE_INIT if siglip else CLIP_LOG_SCALE_INIT,
        with_bias=siglip,
        dtype=dtype,
    )


class Clip(Method):
    """Both towers trained; symmetric InfoNCE over the global batch."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = build_two_tower(config.model, precision.compute_dtype(config))
        self.mesh = None

    def setup(self, ctx: SetupContext) -> None:
        self.mesh = ctx.mesh

    def init(self, rng, batch):
        rngs = {"params": rng, "dropout": rng}
        return self.model.init(
            rngs, batch["image"], batch["input_ids"], batch["attention_mask"], train=False
        )

    def importers(self):
        return pretrained.two_tower_importers(self.config.model)

    def group_rules(self) -> tuple[str, ...]:
        # A fixed temperature (and SigLIP bias): the top-level scalars stay at their init.
        if self.config.model.learn_temperature:
            return ()
        return ("log_scale -> frozen", "bias -> frozen")

    def _scale(self, extras) -> jax.Array:
        m = self.config.model
        if not m.learn_temperature:
            return 1.0 / m.temperature
        return logit_scale(extras["log_scale"], None if m.loss == "siglip" else 100.0)

    def loss(self, variables, batch, rng, train):
        mutable = [k for k in variables if k != "params"] if train else []
        (zimg, ztxt, extras), new_state = self.model.apply(
            variables,
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
            train=train,
            rngs={"dropout": rng},
            mutable=mutable,
        )
        scale = self._scale(extras)
        m = self.config.model
        if m.loss == "siglip":
            bias = extras["bias"] if m.learn_temperature else SIGLIP_BIAS_INIT
            if m.memory_light:
                loss, metrics = sharded_siglip_loss(zimg, ztxt, scale, bias, mesh=self.mesh)
            else:
                loss, metrics = siglip_loss(zimg, ztxt, scale, bias)
        elif m.memory_light:
            loss, metrics = sharded_clip_loss(zimg, ztxt, scale, mesh=self.mesh)
        else:
            loss, metrics = clip_loss(zimg, ztxt, scale)
        return loss, {**metrics, "logit_scale": scale}, dict(new_state)

    def embed_images(self, variables, batch):
        return self.model.apply(variables, batch["image"], method=TwoTower.embed_images)

    def feature_pyramid(self, variables, batch):
        return image_tower_pyramid(self.model, variables, batch)

    def embed_texts(self, variables, batch):
        return self.model.apply(
            variables, batch["input_ids"], batch["attention_mask"], method=TwoTower.embed_texts
        )
