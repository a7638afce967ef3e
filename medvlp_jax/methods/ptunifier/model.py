"""PTUnifier's model: a ViT and a BERT-family tower, per-token projections with modality-type
embeddings into co-attention fusion, poolers, prompt pools and the pre-training heads.

Streams. An image enters as its embedded tokens `[CLS + pos0 ; patches + pos]` (ViT `embed`),
a report as BERT's embeddings. A missing modality is replaced at the tower input by prompts
chosen from a pool (`models.prompt_pool`), as the released code does:

- image missing (text only): query = masked mean of the text embeddings without the first
  token; the image stream is `[CLS + pos0 ; Pv[top-k]]` through the image tower.
- text missing (image only): query = mean of the embedded patches (without the class token);
  the text stream is `[emb([CLS]) ; Pt[top-k] ; emb([SEP])]` (all attended) through the text
  tower's layers.
- pool size 0: no prompts, the missing stream is its class token(s) only.

Both towers' outputs go through a per-token Linear to the fusion width H, plus a modality
embedding (0 text, 1 image), then `CoAttentionFusion` (x = text stream, y = image stream).
The fused feature is `[tanh(Dense(x[:, 0])) ; tanh(Dense(y[:, 0]))]`, `[B, 2H]`.

Params: image, text (towers), fusion_text_proj, fusion_image_proj, modality_embed [2, H],
fusion (co-attention layers), fusion_text_pooler, fusion_image_pooler, visual_pool [Pv, Dv],
text_pool [Pt, Dt], mlm_head, itm_head, itc_head (image_norm, image_proj, text_norm, text_proj).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from medvlp_jax.losses.common import l2_normalize
from medvlp_jax.losses.matching import itm_pairs
from medvlp_jax.models.builders import build_image_tower, build_text_tower
from medvlp_jax.models.fusion import CoAttentionFusion
from medvlp_jax.models.heads import MLMHead, masked_mean
from medvlp_jax.models.layers import Dtype, dense, embedding, layer_norm, partitioned
from medvlp_jax.models.prompt_pool import select_prompts
from medvlp_jax.models.transformer import TransformerConfig
from medvlp_jax.models.vit import DENSE_STEM_MAPS, patch_grid

POOL_INIT_STD = 0.02
Stream = tuple[jax.Array, "jax.Array | None"]  # tokens [B, L, D], mask [B, L] (None = all)


class ItcHead(nn.Module):
    """LayerNorm -> Linear(2H -> H, no bias) per modality (the ITC embeddings, not normalised).
    Params: image_norm, image_proj, text_norm, text_proj."""

    width: int
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feature: jax.Array, modality: str) -> jax.Array:
        """feature [B, 2H] (the fused feature) -> [B, H] float32; modality 'image' | 'text'."""
        x = layer_norm(
            self.layer_norm_eps, axis_name="mlp", dtype=self.dtype, name=f"{modality}_norm"
        )(feature)
        proj = dense(
            self.width, ("mlp", "proj"), use_bias=False, dtype=self.dtype, name=f"{modality}_proj"
        )
        return proj(x).astype(jnp.float32)


class PTUnifierModel(nn.Module):
    """See the module docstring.

    Attributes:
      image_cfg / text_cfg: tower configs ('vit'; 'bert' or 'roberta'), frozen for hashing.
      fusion_cfg: the co-attention stack (post-LN, width H).
      visual_pool_size / text_pool_size: rows of Pv / Pt (0 = no prompts for that stream).
      num_visual_prompts / num_text_prompts: k selected per example.
      prompt_similarity: 'dot' or 'cosine' (`models.prompt_pool`).
      cls_token_id / sep_token_id: the tokenizer's ids around textual prompts.
      hard_negatives: ITM negatives drawn from the ITC similarities (else uniformly).
      dtype: compute dtype of the projections, fusion heads and pools' gathers.
    """

    image_cfg: ml_collections.FrozenConfigDict
    text_cfg: ml_collections.FrozenConfigDict
    fusion_cfg: TransformerConfig
    visual_pool_size: int
    text_pool_size: int
    num_visual_prompts: int
    num_text_prompts: int
    cls_token_id: int
    sep_token_id: int
    prompt_similarity: str = "dot"
    hard_negatives: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        self.image = build_image_tower(ml_collections.ConfigDict(self.image_cfg))
        self.text = build_text_tower(ml_collections.ConfigDict(self.text_cfg))
        h = self.fusion_cfg.width
        kw = dict(dtype=self.dtype)
        self.fusion_text_proj = dense(h, ("embed", "mlp"), **kw)
        self.fusion_image_proj = dense(h, ("embed", "mlp"), **kw)
        self.modality_embed = embedding(2, h, (None, "embed"), **kw)
        self.fusion = CoAttentionFusion(self.fusion_cfg)
        self.fusion_text_pooler = dense(h, ("embed", "mlp"), **kw)
        self.fusion_image_pooler = dense(h, ("embed", "mlp"), **kw)
        pool_init = nn.initializers.normal(POOL_INIT_STD)
        if self.visual_pool_size:
            self.visual_pool = self.param(
                "visual_pool",
                partitioned(pool_init, None, "embed"),
                (self.visual_pool_size, self.image_cfg.width),
            )
        if self.text_pool_size:
            self.text_pool = self.param(
                "text_pool",
                partitioned(pool_init, None, "embed"),
                (self.text_pool_size, self.text_cfg.width),
            )
        eps = self.fusion_cfg.layer_norm_eps
        self.mlm_head = MLMHead(self.text_cfg.vocab_size, layer_norm_eps=eps, **kw)
        self.itm_head = dense(2, ("mlp", None), **kw)
        self.itc_head = ItcHead(h, **kw)

    # -- stream inputs -------------------------------------------------------------------

    def _visual_prompts(self, text_emb: jax.Array, mask: jax.Array) -> jax.Array:
        """The image stream standing in for a missing image: text_emb [B, T, Dt] (BERT
        embeddings), mask [B, T] -> [B, 1 + k, Dv] embedded image tokens."""
        b = text_emb.shape[0]
        cls = jnp.broadcast_to(self.image.class_token(), (b, 1, self.image_cfg.width))
        if not self.visual_pool_size:
            return cls
        query = masked_mean(text_emb[:, 1:], mask[:, 1:])
        rows, _ = select_prompts(
            query, self.visual_pool, self.num_visual_prompts, self.prompt_similarity
        )
        return jnp.concatenate([cls, rows.astype(cls.dtype)], axis=1)

    def _text_prompts(self, image_emb: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        """The text stream standing in for a missing report: image_emb [B, 1 + N, Dv] ->
        (embedded tokens [B, k + 2, Dt], mask [B, k + 2] all ones)."""
        b = image_emb.shape[0]

        def special(token_id: int) -> jax.Array:
            return self.text.embed(jnp.full((b, 1), token_id, jnp.int32), train=train)

        parts = [special(self.cls_token_id)]
        if self.text_pool_size:
            rows, _ = select_prompts(
                jnp.mean(image_emb[:, 1:], axis=1),
                self.text_pool,
                self.num_text_prompts,
                self.prompt_similarity,
            )
            parts.append(rows.astype(parts[0].dtype))
        parts.append(special(self.sep_token_id))
        tokens = jnp.concatenate(parts, axis=1)
        return tokens, jnp.ones(tokens.shape[:2], jnp.int32)

    # -- towers and fusion ---------------------------------------------------------------
    # Each takes several inputs at once, padded to one length and stacked on the batch axis:
    # one tower call and one fusion call per step instead of one per input (a third of the
    # program to compile, and larger matmuls).

    def _encode_images(self, embedded: list[jax.Array], *, train: bool) -> list[Stream]:
        """Embedded image-stream inputs, each [B, N_i, Dv] -> their fusion inputs
        (tokens [B, N, H], mask [B, N]), N = max N_i."""
        tokens, mask = _stack([(e, None) for e in embedded])
        out = self.image.encode(tokens, mask, train=train)["normed_tokens"]
        out = self.fusion_image_proj(out) + self.modality_embed(jnp.ones(out.shape[:2], int))
        return _unstack(out, mask, len(embedded))

    def _encode_texts(self, embedded: list[Stream], *, train: bool) -> list[Stream]:
        """Embedded text-stream inputs (tokens [B, T_i, Dt], mask [B, T_i]) -> their fusion
        inputs (tokens [B, T, H], mask [B, T]), T = max T_i."""
        tokens, mask = _stack(embedded)
        out = self.text.encode(tokens, mask, train=train)["tokens"]
        out = self.fusion_text_proj(out) + self.modality_embed(jnp.zeros(out.shape[:2], int))
        return _unstack(out, mask, len(embedded))

    def _fuse(self, pairs: list[tuple[Stream, Stream]], *, train: bool) -> list[dict]:
        """(text, image) fusion inputs -> per pair {'text_tokens' [B, T, H], 'image_tokens'
        [B, N, H], 'feature' [B, 2H]}."""
        text, text_mask = _stack([t for t, _ in pairs])
        image, image_mask = _stack([i for _, i in pairs])
        x, y = self.fusion(text, image, text_mask, image_mask, deterministic=not train)
        feature = jnp.concatenate(
            [
                jnp.tanh(self.fusion_text_pooler(x[:, 0])),
                jnp.tanh(self.fusion_image_pooler(y[:, 0])),
            ],
            axis=-1,
        )
        n = len(pairs)
        return [
            {"text_tokens": xt, "image_tokens": yi, "feature": f}
            for xt, yi, f in zip(jnp.split(x, n), jnp.split(y, n), jnp.split(feature, n))
        ]

    # -- the three ways in ---------------------------------------------------------------

    def image_only(self, images: jax.Array, *, train: bool = False) -> dict:
        """images -> the fused outputs of (image, textual prompts) (see `_fuse`)."""
        return self._image_only(self.image.embed(images, train=train), train=train)

    def image_pyramid(self, images: jax.Array) -> tuple[jax.Array, ...]:
        """Feature maps for dense heads, fine to coarse: the image tower's stem maps (see
        `VisionTransformer`'s `pyramid`), then the fused image stream of (image, textual
        prompts) as a grid [B, h, w, H] (its patch rows)."""
        emb, stem_maps = self.image.embed_and_stem_maps(images)
        fused = self._image_only(emb, train=False)["image_tokens"][:, 1:]
        grid = patch_grid(fused, images.shape, self.image.patch_size)
        return (*stem_maps[:DENSE_STEM_MAPS], grid)

    def _image_only(self, emb: jax.Array, *, train: bool) -> dict:
        (image,) = self._encode_images([emb], train=train)
        (text,) = self._encode_texts([self._text_prompts(emb, train=train)], train=train)
        return self._fuse([(text, image)], train=train)[0]

    def text_only(self, ids: jax.Array, mask: jax.Array, *, train: bool = False) -> dict:
        """ids, mask [B, T] -> the fused outputs of (visual prompts, text)."""
        emb = self.text.embed(ids, train=train)
        (text,) = self._encode_texts([(emb, mask)], train=train)
        (image,) = self._encode_images([self._visual_prompts(emb, mask)], train=train)
        return self._fuse([(text, image)], train=train)[0]

    def image_text(self, images, ids, mask, *, train: bool = False) -> dict:
        """The paired fused outputs of (images[i], text[i])."""
        (image,) = self._encode_images([self.image.embed(images, train=train)], train=train)
        (text,) = self._encode_texts([(self.text.embed(ids, train=train), mask)], train=train)
        return self._fuse([(text, image)], train=train)[0]

    # -- heads ---------------------------------------------------------------------------

    def itc_embeddings(self, image_feature: jax.Array, text_feature: jax.Array):
        """Fused features of the image-only and text-only paths -> ITC embeddings [B, H] each."""
        return self.itc_head(image_feature, "image"), self.itc_head(text_feature, "text")

    def itm_logits(self, feature: jax.Array) -> jax.Array:
        """[B, 2H] -> [B, 2] float32 (class 1 = matched)."""
        return self.itm_head(feature).astype(jnp.float32)

    def pretrain(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        masked_ids: jax.Array,
        attention_mask: jax.Array,
        itm_rng: jax.Array,
        *,
        itc: bool = True,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        """Everything one pre-training step needs:

        - MLM: (image, masked text) -> `mlm_logits` [B, T, V].
        - ITM: (image of `itm_index`, text) -> `itm_logits` [B, 2], `itm_labels` [B].
        - ITC (if `itc` or hard negatives): `itc_image` = (image, textual prompts),
          `itc_text` = (visual prompts, text) embeddings [B, H].

        Each tower runs once (on all its inputs stacked) and the image tower's output is
        shared by the MLM, ITM and ITC paths (ITM gathers it by row), the unmasked text
        tower's by ITM and ITC; the fusion runs once (twice with hard negatives).
        """
        b = images.shape[0]
        image_emb = self.image.embed(images, train=train)
        text_emb = self.text.embed(jnp.concatenate([masked_ids, input_ids]), train=train)
        masked_emb, text_emb = jnp.split(text_emb, 2)
        with_itc = itc or self.hard_negatives
        image_inputs, text_inputs = (
            [image_emb],
            [(masked_emb, attention_mask), (text_emb, attention_mask)],
        )
        if with_itc:
            image_inputs.append(self._visual_prompts(text_emb, attention_mask))
            text_inputs.append(self._text_prompts(image_emb, train=train))
        image, *visual = self._encode_images(image_inputs, train=train)
        masked_text, text, *prompted = self._encode_texts(text_inputs, train=train)

        def itm_pair(similarity):
            index, labels = itm_pairs(itm_rng, b, similarity)
            gathered = jax.tree.map(lambda x: jnp.take(x, index, axis=0), image)
            return (text, gathered), labels

        pairs = [(masked_text, image)]
        if with_itc:
            pairs += [(prompted[0], image), (text, visual[0])]
        if not self.hard_negatives:
            itm_inputs, labels = itm_pair(None)
            pairs.append(itm_inputs)
        fused = self._fuse(pairs, train=train)
        # The text streams share the longest length (textual prompts may exceed T).
        text_len = input_ids.shape[1]
        out = {"mlm_logits": self.mlm_head(fused[0]["text_tokens"][:, :text_len])}
        if with_itc:
            out["itc_image"], out["itc_text"] = self.itc_embeddings(
                fused[1]["feature"], fused[2]["feature"]
            )
        if self.hard_negatives:
            similarity = jax.lax.stop_gradient(
                l2_normalize(out["itc_text"]) @ l2_normalize(out["itc_image"]).T
            )
            itm_inputs, out["itm_labels"] = itm_pair(similarity)
            itm = self._fuse([itm_inputs], train=train)[0]
        else:
            out["itm_labels"] = labels
            itm = fused[-1]
        out["itm_logits"] = self.itm_logits(itm["feature"])
        return out

    def __call__(self, images, input_ids, attention_mask, *, train: bool = False):
        """Creates every parameter (for `init`): pre-training outputs with ITC."""
        return self.pretrain(
            images, input_ids, input_ids, attention_mask, jax.random.key(0), train=train
        )


def _stack(streams: list[Stream]) -> tuple[jax.Array, jax.Array | None]:
    """Streams of lengths L_i -> (tokens [n * B, L, D], mask [n * B, L]) padded to L = max L_i
    (padding masked out); the mask is None when no stream is masked or padded."""
    length = max(t.shape[1] for t, _ in streams)
    if all(m is None and t.shape[1] == length for t, m in streams):
        return jnp.concatenate([t for t, _ in streams]), None
    tokens, masks = [], []
    for t, m in streams:
        pad = length - t.shape[1]
        m = jnp.ones(t.shape[:2], jnp.int32) if m is None else m.astype(jnp.int32)
        tokens.append(jnp.pad(t, ((0, 0), (0, pad), (0, 0))))
        masks.append(jnp.pad(m, ((0, 0), (0, pad))))
    return jnp.concatenate(tokens), jnp.concatenate(masks)


def _unstack(tokens: jax.Array, mask: jax.Array | None, n: int) -> list[Stream]:
    """Inverse of `_stack` on the batch axis (every part keeps the common length)."""
    masks = [None] * n if mask is None else jnp.split(mask, n)
    return list(zip(jnp.split(tokens, n), masks))
