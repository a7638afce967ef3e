"""PTUnifier (Chen et al., ICCV 2023): one fusion model for image-only, text-only and
image+text inputs, with soft prompt pools standing in for the missing modality.

Loss (float32): `mlm_weight * MLM + itm_weight * ITM + itc_weight * ITC` (1 / 0.5 / 0.1).
- MLM: `mlm_prob` of the real, non-special tokens (and padding with `mlm_mask_padding`, as
  released), 80 / 10 / 10 mask / random / keep, drawn in the step from its rng; predicted from
  the fused text stream of (image, masked text).
- ITM: exactly half of the pairs keep their image, the others get another image of the global
  batch (uniformly, or from the ITC similarities with `hard_negatives`).
- ITC: symmetric InfoNCE between (image, textual prompts) and (visual prompts, text)
  embeddings at temperature `itc_temperature` (0.1); `itc_enabled=False` drops it (the
  released code never computes it: its task key has a typo).

Config (`config.model`): `image` ('vit'), `text` ('bert' | 'roberta'), `drop_last_image_block`,
`fusion` (width, num_layers, num_heads, mlp_dim, dropout_rate, attention_dropout_rate,
layer_norm_eps), `pool_size` (both pools; `visual_pool_size` / `text_pool_size` -1 = it),
`num_visual_prompts` (k, 49), `num_text_prompts` (k, 32), `prompt_similarity`, `freeze_pools`,
`hard_negatives`, `mlm_prob`, `mlm_mask_padding`, `itc_enabled`, `itc_temperature`,
`mlm_weight`, `itm_weight`, `itc_weight`, `lr_multiplier` (heads, fusion and pools).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from medvlp_jax import precision
from medvlp_jax.losses.contrastive import clip_loss
from medvlp_jax.losses.matching import itm_loss
from medvlp_jax.losses.mlm import mask_tokens, mlm_loss
from medvlp_jax.methods.base import Method, SetupContext
from medvlp_jax.methods.ptunifier.model import PTUnifierModel
from medvlp_jax.models.builders import build_image_tower, build_text_tower
from medvlp_jax.models.pretrained import tower_importer
from medvlp_jax.models.transformer import post_ln_config
from medvlp_jax.rng import step_rng_context

# The parameters the released optimiser gives `lr_multiplier` x the base lr: the heads, the
# fusion module (projections, co-attention layers, poolers) and the prompt pools.
BOOSTED = r"(mlm_head|itm_head|itc_head|fusion\w*|visual_pool|text_pool)(/.*)?"
POOLS = r"(visual_pool|text_pool)"


def image_tower_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model.image`, one block shorter with `drop_last_image_block` (the released model runs
    11 of CLIP's 12 blocks)."""
    cfg = ml_collections.ConfigDict(model_cfg.image)
    if model_cfg.drop_last_image_block:
        if cfg.num_layers < 2:
            raise ValueError("model.drop_last_image_block needs model.image.num_layers >= 2")
        cfg.num_layers -= 1
    return cfg


def pool_sizes(model_cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """(visual, text) pool rows: `visual_pool_size` / `text_pool_size`, -1 = `pool_size`."""
    sizes = []
    for pool in ("visual", "text"):
        size = model_cfg[f"{pool}_pool_size"]
        size = model_cfg.pool_size if size == -1 else size
        if size < 0:
            raise ValueError(
                f"model.{pool}_pool_size={model_cfg[f'{pool}_pool_size']}, model.pool_size="
                f"{model_cfg.pool_size}: a pool size is >= 0 (-1 = model.pool_size)"
            )
        sizes.append(size)
    return sizes[0], sizes[1]


def _check(model_cfg: ml_collections.ConfigDict) -> None:
    if model_cfg.image.name != "vit":
        raise ValueError(f"PTUnifier needs model.image.name='vit', got {model_cfg.image.name!r}")
    if model_cfg.text.name not in ("bert", "roberta"):
        raise ValueError(
            f"PTUnifier needs model.text.name 'bert' or 'roberta', got {model_cfg.text.name!r}"
        )
    if model_cfg.image.width != model_cfg.text.width:
        raise ValueError(
            "PTUnifier queries each pool with the other tower's embeddings: model.image.width "
            f"({model_cfg.image.width}) must equal model.text.width ({model_cfg.text.width})"
        )
    pools = zip(
        ("visual", "text"), pool_sizes(model_cfg), ("num_visual_prompts", "num_text_prompts")
    )
    for pool, size, k in pools:
        if size and not 0 < model_cfg[k] <= size:
            raise ValueError(
                f"the {pool} pool has {size} rows and model.{k}={model_cfg[k]}: need "
                f"0 < {k} <= the pool size"
            )
    weights = ("mlm_weight", "itm_weight", "itc_weight")
    if any(model_cfg[w] < 0 for w in weights):
        raise ValueError(f"model.{{{', '.join(weights)}}} must be >= 0")


class PTUnifier(Method):
    """MLM + ITM + ITC on a co-attention fusion model with prompt pools (see module doc)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        _check(config.model)
        self.model: PTUnifierModel | None = None
        self.mask_token_id = -1

    def setup(self, ctx: SetupContext) -> None:
        tok = ctx.tokenizer
        missing = [n for n in ("cls", "sep", "mask") if getattr(tok, f"{n}_token_id") is None]
        if missing:
            raise ValueError(f"data.tokenizer has no {missing} token(s), which PTUnifier needs")
        self.mask_token_id = tok.mask_token_id
        self.model = self._build(tok.cls_token_id, tok.sep_token_id)

    def _build(self, cls_token_id: int, sep_token_id: int) -> PTUnifierModel:
        m, dtype = self.config.model, precision.compute_dtype(self.config)
        f = m.fusion
        visual_pool, text_pool = pool_sizes(m)
        fusion = post_ln_config(
            f.width,
            f.num_layers,
            f.num_heads,
            f.mlp_dim,
            dropout_rate=f.dropout_rate,
            attention_dropout_rate=f.attention_dropout_rate,
            layer_norm_eps=f.layer_norm_eps,
            dtype=dtype,
        )
        return PTUnifierModel(
            image_cfg=ml_collections.FrozenConfigDict(image_tower_config(m)),
            text_cfg=ml_collections.FrozenConfigDict(m.text),
            fusion_cfg=fusion,
            visual_pool_size=visual_pool,
            text_pool_size=text_pool,
            num_visual_prompts=m.num_visual_prompts,
            num_text_prompts=m.num_text_prompts,
            cls_token_id=cls_token_id,
            sep_token_id=sep_token_id,
            prompt_similarity=m.prompt_similarity,
            hard_negatives=m.hard_negatives,
            dtype=dtype,
        )

    def init(self, rng, batch):
        return self.model.init(
            {"params": rng, "dropout": rng},
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
        )

    def importers(self):
        m = self.config.model
        text = tower_importer(build_text_tower(m.text))
        full_image = tower_importer(build_image_tower(m.image))
        if not m.drop_last_image_block:
            return {"image": full_image, "text": text}
        last = f"layer_{m.image.num_layers - 1}"

        def image(source: str) -> dict:
            variables = full_image(source)
            variables["params"]["encoder"].pop(last)
            return variables

        return {"image": image, "text": text}

    def group_rules(self) -> tuple[str, ...]:
        m = self.config.model
        rules = (f"{POOLS} -> frozen",) if m.freeze_pools else ()
        if m.lr_multiplier != 1:
            rules += (f"{BOOSTED} -> lr={m.lr_multiplier:g}",)
        return rules

    def _mlm_candidates(self, input_ids, attention_mask):
        """[B, T] bool: tokens MLM may select (never [CLS] / [SEP]; padding only with
        `mlm_mask_padding`)."""
        special = (input_ids == self.model.cls_token_id) | (input_ids == self.model.sep_token_id)
        real = jnp.ones_like(special) if self.config.model.mlm_mask_padding else attention_mask > 0
        return real & ~special

    def loss(self, variables, batch, rng, train):
        with step_rng_context():
            return self._loss(variables, batch, rng, train)

    def _loss(self, variables, batch, rng, train):
        m = self.config.model
        k_mask, k_itm, k_drop = jax.random.split(rng, 3)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        masked_ids, selected = mask_tokens(
            k_mask,
            ids,
            self._mlm_candidates(ids, mask),
            mask_token_id=self.mask_token_id,
            vocab_size=m.text.vocab_size,
            prob=m.mlm_prob,
        )
        mutable = [k for k in variables if k != "params"] if train else []
        out, new_state = self.model.apply(
            variables,
            batch["image"],
            ids,
            masked_ids,
            mask,
            k_itm,
            itc=m.itc_enabled,
            train=train,
            rngs={"dropout": k_drop},
            mutable=mutable,
            method=PTUnifierModel.pretrain,
        )
        mlm, mlm_metrics = mlm_loss(out["mlm_logits"], ids, selected)
        itm, itm_metrics = itm_loss(out["itm_logits"], out["itm_labels"])
        total = m.mlm_weight * mlm + m.itm_weight * itm
        metrics = {"mlm_loss": mlm, "itm_loss": itm, **mlm_metrics, **itm_metrics}
        if m.itc_enabled:
            itc, itc_metrics = clip_loss(out["itc_image"], out["itc_text"], 1.0 / m.itc_temperature)
            total = total + m.itc_weight * itc
            metrics.update(
                itc_loss=itc,
                itc_i2t_acc=itc_metrics["i2t_acc"],
                itc_t2i_acc=itc_metrics["t2i_acc"],
            )
        return total, metrics, dict(new_state)

    # -- predict functions ---------------------------------------------------------------

    def _apply(self, variables, method, *args):
        return self.model.apply(variables, *args, method=method)

    def embed_images(self, variables, batch):
        """ITC image embeddings [B, H] of (image, textual prompts)."""
        feature = self.image_features(variables, batch)
        return self._apply(variables, lambda mdl, f: mdl.itc_head(f, "image"), feature)

    def embed_texts(self, variables, batch):
        """ITC text embeddings [B, H] of (visual prompts, text)."""
        feature = self.text_features(variables, batch)
        return self._apply(variables, lambda mdl, f: mdl.itc_head(f, "text"), feature)

    def image_features(self, variables, batch):
        """[B, 2H] fused feature of (image, textual prompts): image-only classification."""
        return self._apply(variables, PTUnifierModel.image_only, batch["image"])["feature"]

    def text_features(self, variables, batch):
        """[B, 2H] fused feature of (visual prompts, text): text-only classification."""
        out = self._apply(
            variables, PTUnifierModel.text_only, batch["input_ids"], batch["attention_mask"]
        )
        return out["feature"]

    def pair_scores(self, variables, batch):
        """[B] ITM log-odds that image i and text i match."""
        out = self._apply(
            variables,
            PTUnifierModel.image_text,
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
        )
        logits = self._apply(variables, PTUnifierModel.itm_logits, out["feature"])
        return logits[:, 1] - logits[:, 0]

    def feature_pyramid(self, variables, batch):
        """The image tower's stem maps, then the fused image stream of (image, textual
        prompts) as a grid (`PTUnifierModel.image_pyramid`)."""
        return self._apply(variables, PTUnifierModel.image_pyramid, batch["image"])

    def feature_map(self, variables, batch):
        """[B, N, Dv] the image tower's patch tokens (after its final LayerNorm)."""

        def patches(mdl, images):
            return mdl.image(images)["normed_tokens"][:, 1:]

        return self._apply(variables, patches, batch["image"])

    def predict_fns(self):
        return {
            **super().predict_fns(),
            "image_features": self.image_features,
            "text_features": self.text_features,
            "pair_score": self.pair_scores,
            "feature_map": self.feature_map,
        }
