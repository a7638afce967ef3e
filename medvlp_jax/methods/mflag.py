"""M-FLAG (Liu et al., MICCAI 2023): a frozen language model and latent-space geometry.

The image tower (ResNet-50; its global-average-pooled feature `Z` [B, 2048]) and two
projectors are trained; the BERT-family language model is fully frozen (`trainable` False:
no gradient use, no optimizer state, bit-identical after training). With
`p = l2norm(proj_v(Z))` and `q = l2norm(proj_t(t_cls))` (`t_cls` [B, D_text] the LM's
final-layer [CLS] state), the loss is `L = L_align(p, q) + L_orth(Z)` in float32:
`L_align = mean_b 4 - 4 p_b.q_b` (as released) and the Barlow-style orthogonality of
`C = Z^T Z / B` (see `losses.orthogonality`), with `B` the global batch (default) or each
batch shard's own rows (`orth_batch='per_device'`, the released code's per-GPU behaviour).
Both projectors are Linear -> BN -> ReLU -> Linear -> BN(no scale, no bias), BN in train mode,
with global-batch statistics by default or each batch shard's own (`bn_stats='per_device'`, the
released code: DDP without SyncBatchNorm; `models.batch_norm`).
With `train.compute_dtype=bfloat16` the towers and projectors compute in bf16 (`precision`);
Z, p, q and t_cls come out float32.

Frozen-embedding cache (beyond the original): the released code runs its frozen LM in eval
mode (`from_pretrained` returns it so and nothing calls `.train()` on it), so its [CLS]
embeddings are a function of the report alone. Without dropout in the frozen LM
(`text_dropout_in_frozen_lm=False`, the default and the released behaviour) `t_cls` of every
training report is computed once per dataset in `setup` (sharded, batched;
`embedding_cache`), stored under `text_cache_dir` keyed by LM weights + tokenizer + texts,
and a data hook adds it to each example as `text_cls` [D_text], so the train step never runs
the LM. `text_dropout_in_frozen_lm=True` (an option of ours, not the released code's) runs the
LM every step with its dropout active, a noisier text target.
Evaluation always runs the LM (class prompts and test reports are not cached).

Config (`config.model`): `image`, `text` (tower configs; text must be 'bert' or 'roberta'),
pre-trained towers through `config.init` loads into 'image' / 'text' (`importers`; e.g.
'minilm' or a CXR-BERT folder for the LM),
`proj_hidden` (2048), `proj_dim` (1024), `orth_normalize` (False), `orth_lambda_offdiag`
(0.0051), `orth_weight` (1.0, the paper's plain sum; 0 ablates L_orth), `orth_batch`
('global' | 'per_device'), `bn_stats` ('global' | 'per_device': the projectors' batch norms;
the image tower's are its own `bn_stats` field), `bn_unbiased_running_var` (False; True:
PyTorch's running variance), `text_dropout_in_frozen_lm` (False),
`text_cache_dir` ('' = `<data cache dir>/text_cls`), `text_cache_batch_size`.

Params: `image` (tower), `proj_v`, `proj_t` (MLPHead) and `text` (the frozen LM, initialised
from `config.seed` alone so that `setup` can rebuild the exact weights before `init` runs).
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec

from medvlp_jax import embedding_cache, optim, precision, weights
from medvlp_jax.data.config import resolve_cache_dir
from medvlp_jax.losses.alignment import mflag_alignment_loss
from medvlp_jax.losses.common import l2_normalize
from medvlp_jax.losses.orthogonality import orthogonality_loss
from medvlp_jax.methods.base import Method, SetupContext, image_tower_pyramid
from medvlp_jax.models import pretrained
from medvlp_jax.models.batch_norm import BatchNormMode
from medvlp_jax.models.builders import build_image_tower, build_text_tower
from medvlp_jax.models.heads import MLPHead
from medvlp_jax.models.layers import Dtype
from medvlp_jax.parallel.mesh import BATCH_AXES
from medvlp_jax.parallel.sharding import ACTIVATION_RULES, strip_boxes, variable_shardings

ORTH_BATCH = ("global", "per_device")
TEXT_TOWERS = ("bert", "roberta")
TEXT_FIELD = "text_cls"
# The frozen LM's random init (used when no `config.init` load writes it) is drawn from
# fold_in(PRNGKey(config.seed), TEXT_INIT_SALT), independent of the trainer's init key.
TEXT_INIT_SALT = 0x7E57


class MFlagModel(nn.Module):
    """Image tower + the two projectors (the trainable part of M-FLAG).

    Attributes:
      image_cfg: image tower config, frozen for hashing: M-FLAG's `tower_config('resnet50')`;
        any image tower of `builders` works (its `pooled` output is Z).
      proj_hidden, proj_dim: projector widths (M-FLAG: 2048 -> 1024).
      dtype: the projectors' compute dtype (`precision.compute_dtype`; params float32).
      bn: the projectors' batch-norm statistics (`models.batch_norm`).
    """

    image_cfg: ml_collections.FrozenConfigDict
    proj_hidden: int = 2048
    proj_dim: int = 1024
    dtype: Dtype = jnp.float32
    bn: BatchNormMode = BatchNormMode()

    def setup(self):
        self.image = build_image_tower(ml_collections.ConfigDict(self.image_cfg))
        widths = (self.proj_hidden, self.proj_dim)
        head = dict(final_norm="bn_no_affine", bn=self.bn, dtype=self.dtype)
        self.proj_v = MLPHead(widths, **head)
        self.proj_t = MLPHead(widths, **head)

    def image_features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """images [B, H, W, C] -> Z [B, D_img] float32 (ResNet-50: global average pool,
        post-ReLU)."""
        return self.image(images, train=train)["pooled"].astype(jnp.float32)

    def project(
        self, z: jax.Array, text_cls: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """Z [B, D_img], t_cls [B, D_text] -> (proj_v(Z), proj_t(t_cls)), both [B, proj_dim]
        float32."""
        p, q = self.proj_v(z, train=train), self.proj_t(text_cls, train=train)
        return p.astype(jnp.float32), q.astype(jnp.float32)

    def embed_images(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> proj_v(Z) [B, proj_dim] float32 (running BN statistics)."""
        return self.proj_v(self.image_features(images)).astype(jnp.float32)

    def embed_text_features(self, text_cls: jax.Array) -> jax.Array:
        """t_cls [B, D_text] -> proj_t(t_cls) [B, proj_dim] float32 (running BN statistics)."""
        return self.proj_t(text_cls).astype(jnp.float32)

    def __call__(self, images: jax.Array, text_cls: jax.Array, *, train: bool = False):
        """Creates every parameter: -> (Z, proj_v(Z), proj_t(t_cls))."""
        z = self.image_features(images, train=train)
        return (z, *self.project(z, text_cls, train=train))


def _split(variables: dict) -> tuple[dict, dict]:
    """Flax variables -> (MFlagModel variables, frozen LM variables)."""
    params = dict(variables["params"])
    text = {"params": params.pop("text")}
    return {**variables, "params": params}, text


def count_params(params, trainable) -> dict:
    """Trainable vs total parameter counts, and M-FLAG's claim in our terms: how many fewer
    parameters train than in a dual encoder where both towers (and projectors) train."""
    total, n_trainable = optim.count_params(params, trainable)
    return {
        "total": total,
        "trainable": n_trainable,
        "frozen": total - n_trainable,
        "fewer_trainable_than_dual_encoder_pct": round(100.0 * (1 - n_trainable / total), 2),
    }


class MFlag(Method):
    """Frozen LM; image tower + projectors trained with alignment + orthogonality losses."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        if m.orth_batch not in ORTH_BATCH:
            raise ValueError(f"config.model.orth_batch={m.orth_batch!r}; expected {ORTH_BATCH}")
        if m.text.name not in TEXT_TOWERS:
            raise ValueError(
                f"config.model.text.name={m.text.name!r}: M-FLAG's language model is a "
                f"BERT-family encoder, one of {TEXT_TOWERS}"
            )
        try:  # run configs written before these fields existed hold neither
            bn = BatchNormMode(m.get("bn_stats", "global"), m.get("bn_unbiased_running_var", False))
        except ValueError as e:
            raise ValueError(f"config.model.bn_stats: {e}") from None
        self.model = MFlagModel(
            ml_collections.FrozenConfigDict(m.image),
            m.proj_hidden,
            m.proj_dim,
            precision.compute_dtype(config),
            bn,
        )
        self.text_tower = build_text_tower(m.text)
        # Compiled once per instance, for every cache build.
        self._jit_text_cls = jax.jit(self.text_cls)
        self._jit_init_text = jax.jit(lambda key: strip_boxes(self._init_text(key)))
        self.mesh = None
        self.lookup: embedding_cache.TextEmbeddingLookup | None = None
        self.cache_hit: bool | None = None

    # --- the frozen language model -------------------------------------------------------

    def _text_key(self) -> jax.Array:
        """The frozen LM's init key: from `config.seed` alone."""
        return jax.random.fold_in(jax.random.PRNGKey(self.config.seed), TEXT_INIT_SALT)

    def _init_text(self, key: jax.Array) -> dict:
        """The frozen LM's random init (boxed variables)."""
        ids = jnp.ones((1, self.config.data.max_text_len), jnp.int32)
        return self.text_tower.init(key, ids, ids, train=False)

    def text_cls(self, text_variables: dict, input_ids, attention_mask, rng=None, train=False):
        """The LM's final-layer [CLS] state [B, D_text] (float32, no gradient). `train` turns
        the LM's dropout on (then `rng` is needed)."""
        out = self.text_tower.apply(
            text_variables,
            input_ids,
            attention_mask,
            train=train,
            rngs={"dropout": rng} if train else None,
        )
        return jax.lax.stop_gradient(out["tokens"][:, 0].astype(jnp.float32))

    def _frozen_text_params(self) -> dict:
        """The LM params the trainer will hold: the seeded random init with the `text/` leaves
        of the `config.init` loads that can write there applied, as the trainer applies them
        (loads into other towers are not read twice)."""
        m = self.config.model
        with _fast_init_rng():
            params = jax.device_get(self._jit_init_text(self._text_key()))["params"]
        size = self.config.data.image_size
        example = {
            "image": jnp.zeros((1, size, size, m.image.channels)),
            "input_ids": jnp.zeros((1, self.config.data.max_text_len), jnp.int32),
        }
        abstract = strip_boxes(jax.eval_shape(self.init, jax.random.PRNGKey(0), example))
        loaded, _ = weights.loaded_leaves(
            self.config.init,
            weights.flatten(abstract),
            self,
            weights.run_resolver(self.config),
            weights.loads_writing(self.config.init, "text"),
        )
        text = {
            path.removeprefix("text/"): value
            for path, value in loaded.get("params", {}).items()
            if path.startswith("text/")
        }
        return weights.overwrite({"params": params}, {"params": text})["params"]

    def _cache_root(self) -> Path:
        m = self.config.model
        if m.text_cache_dir:
            return Path(m.text_cache_dir)
        return resolve_cache_dir(self.config.data.cache_dir) / "text_cls"

    def _build_cache(self, ctx: SetupContext) -> embedding_cache.TextEmbeddingLookup:
        """Loads (or computes and stores) t_cls of every training text."""
        m = self.config.model
        params = self._frozen_text_params()
        texts = [r.text for r in ctx.train_records]
        max_len = self.config.data.max_text_len
        key, parts = embedding_cache.cache_key(
            tower_config=m.text.to_dict(),
            params=params,
            tokenizer=ctx.tokenizer,
            max_len=max_len,
            texts=texts,
        )

        def compute(unique: list[str]) -> np.ndarray:
            with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ACTIVATION_RULES):
                abstract = jax.eval_shape(self._init_text, self._text_key())
                shardings = variable_shardings(abstract, ctx.mesh)
                variables = jax.device_put({"params": params}, shardings)
                return embedding_cache.embed_texts_sharded(
                    self._jit_text_cls,
                    variables,
                    ctx.tokenizer,
                    unique,
                    max_len=max_len,
                    mesh=ctx.mesh,
                    batch_size=m.text_cache_batch_size,
                )

        folder, self.cache_hit = embedding_cache.build_or_load(
            self._cache_root(), key, texts, compute, meta=parts
        )
        return embedding_cache.TextEmbeddingLookup(folder, TEXT_FIELD)

    # --- the Method interface ------------------------------------------------------------

    def setup(self, ctx: SetupContext) -> None:
        self.mesh = ctx.mesh
        if not self.config.model.text_dropout_in_frozen_lm and ctx.train_records:
            self.lookup = self._build_cache(ctx)

    def data_hooks(self, tokenizer) -> tuple:
        return () if self.lookup is None else (self.lookup,)

    def init(self, rng, batch):
        width = self.config.model.text.width
        text_cls = jnp.zeros((batch["image"].shape[0], width), jnp.float32)
        with _fast_init_rng():
            variables = self.model.init({"params": rng}, batch["image"], text_cls, train=False)
            text = self._init_text(self._text_key())
        return {**variables, "params": {**variables["params"], "text": text["params"]}}

    def importers(self):
        return pretrained.two_tower_importers(self.config.model)

    def group_rules(self) -> tuple[str, ...]:
        return ("text/.* -> frozen",)

    def _orthogonality(self, z: jax.Array) -> jax.Array:
        m = self.config.model
        kw = dict(lambda_offdiag=m.orth_lambda_offdiag, normalize=m.orth_normalize)
        if m.orth_batch == "global":
            return orthogonality_loss(z, **kw)
        # Per batch shard, as each GPU of the released code: mean of the shards' losses.
        return jax.shard_map(
            lambda local: jax.lax.pmean(orthogonality_loss(local, **kw), BATCH_AXES),
            mesh=self.mesh,
            in_specs=PartitionSpec(BATCH_AXES, None),
            out_specs=PartitionSpec(),
        )(z)

    def objective(self, z, p, q) -> tuple[jax.Array, dict]:
        """`L_align(p, q) + orth_weight * L_orth(Z)` and its unweighted parts (float32).
        Z [B, D_img], p, q [B, E]."""
        align = mflag_alignment_loss(p, q)
        orth = self._orthogonality(z)
        cosine = jnp.mean(jnp.sum(l2_normalize(p) * l2_normalize(q), axis=-1))
        return align + self.config.model.orth_weight * orth, {
            "align_loss": align,
            "orth_loss": orth,
            "cosine": cosine,
        }

    def features_loss(self, variables, z, text_cls, train: bool):
        """The loss from Z [B, D_img] and t_cls [B, D_text]: (loss, metrics, new mutable
        collections: `variables`' own, with the projectors' batch statistics updated)."""
        model_vars, _ = _split(variables)
        (p, q), state = self.model.apply(
            model_vars,
            z,
            text_cls,
            train=train,
            mutable=["batch_stats"] if train else [],
            method=MFlagModel.project,
        )
        loss, metrics = self.objective(z, p, q)
        return loss, metrics, dict(state)

    def loss(self, variables, batch, rng, train):
        model_vars, text_vars = _split(variables)
        if TEXT_FIELD in batch:
            text_cls = batch[TEXT_FIELD]
        else:
            dropout = train and self.config.model.text_dropout_in_frozen_lm
            text_cls = self.text_cls(
                text_vars, batch["input_ids"], batch["attention_mask"], rng, dropout
            )
        z, image_state = self.model.apply(
            model_vars,
            batch["image"],
            train=train,
            mutable=["batch_stats"] if train else [],
            method=MFlagModel.image_features,
        )
        # Flax returns whole mutable collections: the heads' call passes the image tower's
        # updated statistics through, so it gets them as input.
        return self.features_loss({**variables, **image_state}, z, text_cls, train)

    def embed_images(self, variables, batch):
        model_vars, _ = _split(variables)
        return self.model.apply(model_vars, batch["image"], method=MFlagModel.embed_images)

    def feature_pyramid(self, variables, batch):
        return image_tower_pyramid(self.model, _split(variables)[0], batch)

    def embed_texts(self, variables, batch):
        model_vars, text_vars = _split(variables)
        text_cls = self.text_cls(text_vars, batch["input_ids"], batch["attention_mask"])
        return self.model.apply(model_vars, text_cls, method=MFlagModel.embed_text_features)


def _fast_init_rng():
    """Non-partitionable threefry for parameter init: on XLA:CPU the partitionable variant
    compiles ~5x slower (ResNet-50 init: ~120 s vs ~20 s on 2 shared cores, measured) and
    init arrays here are small enough to generate whole on each device."""
    return jax.threefry_partitionable(False)
