"""PRIOR (Cheng et al., ICCV 2023): prototype representation with global and local alignment
and cross-modal conditional reconstruction, trained in three stages.

Per batch (B reports, S = `max_sentences`, N image regions), all vectorised with masks:

    L_g   InfoNCE(global image, attention-pooled report) at the learnable scale (log_scale)
    L_li  SimSiam between the patch features I and their text contexts c_i
    L_lt  InfoNCE inside each report between l2norm(c_t) and its sentences (local_log_scale)
    L_q   mean |q - x| of the sentence prototype bank (q replaces x from stage 2 on)
    L_img L1(decoder(Dropout2d(I) ++ c_i), image)                      (stage 3)
    L_spg mean L1(Hungarian-matched slots, the report's prototypes)     (stage 3)
    L_kl  KL(softmax(x E^T) || softmax(matched slots E^T))              (stage 3)
    L_gpa InfoNCE(pool(SPB(matched slots)), the report embedding)       (stage 3)

The loss is the `config.model.*_weight`-weighted sum of the terms that are on
(`model.prototypes` adds L_q, `model.reconstruction` the last four); the three stages of
configs/prior.py switch them through stage overrides. Fidelity switches (`:original`):
`nchw_local_tokens`, `causal_decoder`, `faithful_matching_index`, `matching_includes_padding`,
`gumbel_at_eval`, `clamp_logit_scale` (see `default_model_config`).

Predict functions: `embed_image` / `embed_text` (global, [B, E]), `feature_map` (local image
tokens [B, N, E]), and for PRIOR's zero-shot score `class_text` ([B, 2E]: a prompt's report
embedding and its one-sentence embedding) and `class_score` ([B, C], see `class_scores`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from medvlp_jax import precision
from medvlp_jax.losses.common import f32, l2_normalize, masked_mean
from medvlp_jax.losses.contrastive import clip_loss, logit_scale
from medvlp_jax.losses.local import local_infonce_loss
from medvlp_jax.losses.local_alignment import simsiam_loss
from medvlp_jax.losses.prototypes import (
    assign_prototypes,
    prototype_kl_loss,
    quantization_loss,
)
from medvlp_jax.methods.base import Method, SetupContext, image_tower_pyramid
from medvlp_jax.methods.prior import matching
from medvlp_jax.methods.prior.model import PriorModel
from medvlp_jax.methods.prior.sentences import FIELD, SentenceHook
from medvlp_jax.models import heads, pretrained
from medvlp_jax.models.transformer import post_ln_config

IMAGE_TOWERS = ("resnet50", "vit")
TEXT_TOWERS = ("bert", "roberta")
RESNET_STRIDE = 32
MAX_SCALE = 100.0
# Loss weights (config.model.<term>_weight) and the metric each term is logged as.
TERMS = {
    "global": "global_loss",
    "local_image": "local_image_loss",
    "local_text": "local_text_loss",
    "proto": "proto_loss",
    "image_recon": "image_recon_loss",
    "spg": "spg_loss",
    "kl": "kl_loss",
    "gpa": "gpa_loss",
}


def default_model_config() -> ml_collections.ConfigDict:
    """`config.model` fields of PRIOR besides the towers, with the published values."""
    m = ml_collections.ConfigDict()
    m.embed_dim = 768
    m.pool_heads = 8
    m.max_sentences = 16  # S: sentences kept per report (later ones are dropped)
    m.logit_scale_init = 100.0  # both scales (global and local), learnable, log-space
    m.prototypes = False  # the sentence prototype bank (stage 2 on)
    m.num_prototypes = 512
    m.gumbel_tau = 0.9
    m.reconstruction = False  # the decoders and their four losses (stage 3)
    m.num_queries = 16  # Q >= max_sentences
    m.decoder_layers = 8
    m.decoder_heads = 12
    m.decoder_mlp_dim = 3072
    m.decoder_dropout = 0.1
    m.image_dropout = 0.5
    for term in TERMS:
        setattr(m, f"{term}_weight", 1.0)
    m.proto_weight = 10.0
    m.spg_weight = 10.0
    m.zero_shot_local_weight = 0.5
    # Fidelity switches; True/False here is the corrected default, the released code's
    # behaviour is the opposite (configs/prior.py:original).
    m.nchw_local_tokens = False  # the released code's NCHW view without a permute
    m.causal_decoder = False  # the released slot decoder is causal (HF is_decoder=True)
    m.faithful_matching_index = False  # the released code indexes slots by col, not argsort
    m.matching_includes_padding = False  # released: zero-padded prototypes in cost and L1
    m.gumbel_at_eval = False  # released: Gumbel noise in the bank at evaluation too
    m.clamp_logit_scale = True  # released: no clamp (ours: at 100)
    return m


def image_grid(image_cfg, image_size: int) -> tuple[int, int]:
    """(h, w) of the image tower's last feature map for square `image_size` inputs."""
    stride = RESNET_STRIDE if image_cfg.name == "resnet50" else image_cfg.patch_size
    if image_size % stride:
        raise ValueError(
            f"config.data.image_size={image_size} is not a multiple of the image tower's "
            f"stride {stride}"
        )
    return image_size // stride, image_size // stride


def _check(config: ml_collections.ConfigDict) -> None:
    m = config.model
    if m.image.name not in IMAGE_TOWERS:
        raise ValueError(
            f"config.model.image.name={m.image.name!r}; expected one of {IMAGE_TOWERS}"
        )
    if m.text.name not in TEXT_TOWERS:
        raise ValueError(f"config.model.text.name={m.text.name!r}; expected one of {TEXT_TOWERS}")
    if m.embed_dim % 2 or m.embed_dim < 2:
        raise ValueError(f"config.model.embed_dim={m.embed_dim}; expected an even width >= 2")
    if m.logit_scale_init <= 0 or m.gumbel_tau <= 0:
        raise ValueError(
            f"config.model.logit_scale_init={m.logit_scale_init} and gumbel_tau={m.gumbel_tau} "
            "must be > 0"
        )
    if m.reconstruction and m.max_sentences > m.num_queries:
        raise ValueError(
            f"config.model.max_sentences={m.max_sentences} > num_queries={m.num_queries}: "
            "every sentence needs a slot to match"
        )
    if m.reconstruction and not m.prototypes:
        raise ValueError("config.model.reconstruction=True needs config.model.prototypes=True")
    if not 0.0 <= m.image_dropout < 1.0:
        raise ValueError(f"config.model.image_dropout={m.image_dropout}; expected [0, 1)")


def build_model(config: ml_collections.ConfigDict) -> PriorModel:
    """The PriorModel that `config.model` describes."""
    _check(config)
    m = config.model
    dtype = precision.compute_dtype(config)
    grid = image_grid(m.image, config.data.image_size)
    blocks = math.log2(config.data.image_size / grid[0])
    decoder = post_ln_config(
        m.embed_dim,
        m.decoder_layers,
        m.decoder_heads,
        m.decoder_mlp_dim,
        dropout_rate=m.decoder_dropout,
        attention_dropout_rate=m.decoder_dropout,
        dtype=dtype,
    )
    return PriorModel(
        image_cfg=ml_collections.FrozenConfigDict(m.image),
        text_cfg=ml_collections.FrozenConfigDict(m.text),
        grid=grid,
        embed_dim=m.embed_dim,
        pool_heads=m.pool_heads,
        prototypes=m.prototypes,
        num_prototypes=m.num_prototypes,
        gumbel_tau=m.gumbel_tau,
        reconstruction=m.reconstruction,
        decoder_cfg=decoder,
        num_queries=m.num_queries,
        causal_decoder=m.causal_decoder,
        decoder_blocks=int(blocks),
        image_channels=m.image.channels,
        image_dropout=m.image_dropout,
        nchw_local_tokens=m.nchw_local_tokens,
        log_scale_init=math.log(m.logit_scale_init),
        dtype=dtype,
    )


def _forward(model: PriorModel, batch, num_sentences: int, gumbel, train: bool) -> dict:
    """Everything the losses read, in one pass (see `Prior.features`)."""
    img = model.encode_image(batch["image"], train=train)
    raw, mask = model.encode_sentences(
        batch["input_ids"], batch["attention_mask"], batch[FIELD], num_sentences, train=train
    )
    out = head_features(model, img["local"], img["global"], raw, mask, gumbel)
    if model.reconstruction:
        out["recon"] = model.reconstruct_image(img["local"], out["c_image"], train=train)
        out["slots"] = model.generate_slots(img["local"], train=train)
    return out


def head_features(
    model: PriorModel, local, global_image, raw_sentences, mask, gumbel: jax.Array | None
) -> dict:
    """The features of `Prior.features` that PRIOR's heads compute from the towers' outputs
    (all but recon and slots): the bank (when on, Gumbel noise from `gumbel`), the local
    cross-attention, the predictor and the report pool. Call through `model.apply(...,
    method=head_features)`; local [B, N, E], global_image [B, E], raw_sentences [B, S, E],
    mask [B, S]."""
    sentences = model.quantize(raw_sentences, gumbel) if model.prototypes else raw_sentences
    ctx = model.cross_attend(local, sentences, mask)
    return {
        "local": local,
        "global_image": global_image,
        "raw_sentences": raw_sentences,
        "sentences": sentences,
        "mask": mask,
        "global_text": model.pool_text(sentences, mask),
        "c_text": ctx["c_text"],
        "c_image": ctx["c_image"],
        "p_local": model.predict(local),
        "p_context": model.predict(ctx["c_image"]),
        "log_scale": model.log_scale,
        "local_log_scale": model.local_log_scale,
    }


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """[B, S, ...] -> [B, rows, ...] with zero rows appended."""
    pad = [(0, 0), (0, rows - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad)


class Prior(Method):
    """PRIOR: see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = build_model(config)
        self.mesh = None

    def setup(self, ctx: SetupContext) -> None:
        self.mesh = ctx.mesh

    def data_hooks(self, tokenizer) -> tuple:
        m = self.config.model
        return (SentenceHook(tokenizer, self.config.data.max_text_len, m.max_sentences),)

    def init(self, rng, batch):
        return self.model.init(
            {"params": rng, "dropout": rng},
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
            batch[FIELD],
            self.config.model.max_sentences,
        )

    def importers(self):
        return pretrained.two_tower_importers(self.config.model)

    def _scale(self, log_scale: jax.Array) -> jax.Array:
        return logit_scale(log_scale, MAX_SCALE if self.config.model.clamp_logit_scale else None)

    def features(self, variables, batch, rng, train: bool) -> tuple[dict, dict]:
        """The model's pass over `batch` -> (features, updated mutable collections).

        Features: local [B, N, E], global_image [B, E], raw_sentences / sentences [B, S, E]
        (sentences = prototypes when the bank is on), mask [B, S], global_text [B, E],
        c_text [B, S, E], c_image [B, N, E], p_local / p_context (predictor outputs),
        log_scale, local_log_scale, and with reconstruction recon [B, H, W, C], slots [B, Q, E].
        """
        dropout, gumbel = jax.random.split(rng)
        mutable = [k for k in variables if k != "params"] if train else []
        out, state = self.model.apply(
            variables,
            batch,
            self.config.model.max_sentences,
            gumbel if self.model.prototypes else None,
            train,
            rngs={"dropout": dropout},
            mutable=mutable,
            method=_forward,
        )
        return out, dict(state)

    def reconstruction_losses(self, variables, batch, f: dict, rng, scale) -> dict:
        """L_img, L_spg, L_kl and L_gpa from `features` (stage 3)."""
        m = self.config.model
        q = m.num_queries
        mask = _pad_rows(f["mask"], q)
        protos = _pad_rows(jnp.where(f["mask"][..., None], f["sentences"], 0.0), q)
        raw = _pad_rows(f["raw_sentences"], q)
        cost = matching.l1_cost(f["slots"], protos, None if m.matching_includes_padding else mask)
        col = matching.assign(cost, self.mesh)
        index = matching.slot_for_target(col, m.faithful_matching_index)
        matched = matching.matched_slots(f["slots"], index)
        rows = None if m.matching_includes_padding else mask[..., None]
        codebook = variables["params"]["codebook"]
        generated = self.model.apply(
            variables,
            assign_prototypes(matched, codebook, rng=rng, tau=m.gumbel_tau)[0],
            mask,
            method=PriorModel.pool_text,
        )
        return {
            "image_recon": jnp.mean(jnp.abs(f["recon"] - f32(batch["image"]))),
            "spg": masked_mean(jnp.abs(matched - protos), rows),
            "kl": prototype_kl_loss(raw, matched, codebook, mask),
            "gpa": clip_loss(generated, f["global_text"], scale)[0],
        }

    def loss(self, variables, batch, rng, train):
        forward_rng, gumbel = jax.random.split(rng)
        f, state = self.features(variables, batch, forward_rng, train)
        total, metrics = self.loss_from_features(variables, batch, f, gumbel)
        return total, metrics, state

    def loss_from_features(self, variables, batch, f: dict, rng) -> tuple[jax.Array, dict]:
        """(the weighted loss of the terms that are on, metrics) from `features` `f`; `rng`:
        the reconstruction losses' Gumbel noise; of `batch` only L_img reads 'image'."""
        m = self.config.model
        scale, local_scale = self._scale(f["log_scale"]), self._scale(f["local_log_scale"])
        global_loss, global_metrics = clip_loss(f["global_image"], f["global_text"], scale)
        has_text = jnp.any(f["mask"], axis=1)
        terms = {
            "global": global_loss,
            "local_image": simsiam_loss(
                f["p_local"], f["p_context"], f["local"], f["c_image"], has_text[:, None]
            ),
            "local_text": local_infonce_loss(f["c_text"], f["sentences"], f["mask"], local_scale),
        }
        if m.prototypes:
            terms["proto"] = quantization_loss(f["sentences"], f["raw_sentences"], f["mask"])
        if m.reconstruction:
            terms.update(self.reconstruction_losses(variables, batch, f, rng, scale))
        total = sum(getattr(m, f"{name}_weight") * value for name, value in terms.items())
        metrics = {TERMS[name]: value for name, value in terms.items()}
        metrics.update(
            i2t_acc=global_metrics["i2t_acc"],
            t2i_acc=global_metrics["t2i_acc"],
            logit_scale=scale,
            local_logit_scale=local_scale,
            sentences_per_report=jnp.mean(jnp.sum(f["mask"], axis=1)),
        )
        return total, metrics

    # --- evaluation ----------------------------------------------------------------------

    def _eval_gumbel(self) -> jax.Array | None:
        """The bank's noise at evaluation: none (default) or, as released, Gumbel samples from
        a fixed key."""
        if self.model.prototypes and self.config.model.gumbel_at_eval:
            return jax.random.PRNGKey(self.config.seed)
        return None

    def _text(self, variables, batch, one_sentence: bool) -> tuple[jax.Array, jax.Array]:
        """(report embedding [B, E], mean sentence embedding [B, E]) in eval mode;
        `one_sentence`: the whole text is one sentence (class prompts, as released)."""
        ids = batch[FIELD]
        if one_sentence:
            ids = jnp.where(ids >= 0, 0, -1)
        gumbel, num = self._eval_gumbel(), self.config.model.max_sentences

        def run(model: PriorModel):
            sentences, mask = model.encode_sentences(
                batch["input_ids"], batch["attention_mask"], ids, num
            )
            if model.prototypes:
                sentences = model.quantize(sentences, gumbel)
            mean = heads.masked_mean(sentences, mask)
            return model.pool_text(sentences, mask), mean

        return self.model.apply(variables, method=run)

    def embed_images(self, variables, batch):
        return self.model.apply(variables, batch["image"], method=PriorModel.encode_image)["global"]

    def embed_texts(self, variables, batch):
        return self._text(variables, batch, one_sentence=False)[0]

    def feature_pyramid(self, variables, batch):
        return image_tower_pyramid(self.model, variables, batch)

    def feature_map(self, variables, batch) -> jax.Array:
        """Local image tokens [B, N, E] (projected, before any attention)."""
        return self.model.apply(variables, batch["image"], method=PriorModel.encode_image)["local"]

    def class_text(self, variables, batch) -> jax.Array:
        """A class prompt's features [B, 2E]: its report embedding ++ its embedding as one
        sentence (through the bank when it is on)."""
        return jnp.concatenate(self._text(variables, batch, one_sentence=True), axis=-1)

    def class_score(self, variables, batch) -> jax.Array:
        """PRIOR's zero-shot score [B, C] of each image against C classes whose `class_text`
        features [C, 2E] are `batch['class_features']`:
        `softmax_c(scale * cos(g_img, g_c)) + w * softmax_c(local_c)`, where `local_c` is
        the mean of the two sigmoid attention maps between the class sentence and the image's
        regions and w = `model.zero_shot_local_weight`."""
        e = self.config.model.embed_dim
        classes = f32(batch["class_features"])
        g_class, s_class = classes[:, :e], classes[:, e:]

        def run(model: PriorModel):
            img = model.encode_image(batch["image"])
            b = img["local"].shape[0]
            sentences = jnp.broadcast_to(s_class, (b, *s_class.shape))
            att = model.cross_attend(img["local"], sentences, jnp.ones(sentences.shape[:2], bool))
            local = 0.5 * (jnp.mean(att["a_text"], axis=2) + jnp.mean(att["a_image"], axis=1))
            return img["global"], local, model.log_scale

        g_img, local, log_scale = self.model.apply(variables, method=run)
        logits = self._scale(log_scale) * l2_normalize(g_img) @ l2_normalize(g_class).T
        weight = self.config.model.zero_shot_local_weight
        return jax.nn.softmax(logits, axis=-1) + weight * jax.nn.softmax(local, axis=-1)

    def predict_fns(self):
        return {
            **super().predict_fns(),
            "feature_map": self.feature_map,
            "class_text": self.class_text,
            "class_score": self.class_score,
        }
