"""The MCPL model: a frozen CLIP-style two-tower backbone plus deep multi-modal prompts.

Params: `backbone` (a `TwoTower`: frozen) and the trainable prompt parts:
`text_prompts` `[J', K, D*]`, `image_prompts` `[J', K, D*]` (GPCM) or `coupling_{c}` (MaPLe),
`gpcm_{c}`, `ap_shared` `[J', Dj]` (`[J', 2, Dj]` with `separate_ap_params`),
`{text,image}_context` `[R, D]` (`layer0_context` only), `{text,image}_update_{c}`,
`{text,image}_relation_{c}`, `ap_to_image` (Linear D_text -> D_vis), `ap_posemb` `[L, D_vis]`
and `keywords` (the keyword predictor). J = prompt depth, J' = J (J - 1 with
`layer0_context`), n = prompts per modality (2), K = GPCM nodes per modality (`gpcm_nodes`,
default n), R = prompt rows per layer (n + 2 with the AP prompt, else n), c = a deep layer
(1..J-1), Dj = max(D_text, D_vis): the joint width in which prompt parameters shared by both
towers live; each tower reads its first D dims (the published design states it for the AP
params).

Per prompted layer c of each tower (see `prompts.py` for GPCM, update and relation):

1. Modality prompts. Layer 0: the learned contexts `text_prompts[0][:n]`,
   `image_prompts[0][:n]`. Deep layers: `[Pt_c ; Pi_c]` `[2K, Dj]` -> GPCM -> rows 0:n text
   prompts, rows n:2n image prompts. Without GPCM (`gpcm=False`, MaPLe): text prompts are
   `text_prompts[c]` and image prompts `coupling_c(text_prompts[c])`. With `layer0_context`
   (the released code) layer 0 carries all R rows as learned vectors per tower
   (`{text,image}_context`, no keywords) and the other parameters start at layer 1.
2. AP tokens (`ap_prompt=True`): the anatomy sequence `a` and pathology sequence `p` `[B, L]`
   run through the same frozen layers (text side: the text tower itself; image side: the
   frozen token embedding -> `ap_to_image` + `ap_posemb`, no `ln_pre`, the vision layers);
   `a_c`, `p_c` are their hidden states entering layer c. Anatomy token
   `ap_shared[c] + mean(a_c)`, pathology token `ap_shared[c] + mean(p_c)` (masked means; with
   `separate_ap_params` each token has its own vector). `ap_padding_mask=False` (the released
   code) ignores the sequences' padding everywhere: the towers run them unmasked, the means
   and the update's and relation's keys take in every one of the L positions.
3. Prompt update (deep layers, with AP): `Z = PromptUpdate(P, [a_c ; p_c ; prev])`, where
   `prev` are the previous layer's outputs at the prompt rows; relation rows
   `R_c = RelationHead(Z, [a_c ; p_c])` `[B, n, 2L]`, stacked over c -> `[B, n(J-1), 2L]`.
4. Prompt configuration, through the towers' prompt hook (`models/transformer.py`); prompt
   rows sit right after the first token ([CLS] / class token / start-of-text):
   - 'splice': rows `[Z ; AP]` are ordinary tokens: with `S = [x_0 ; Z ; AP ; x_1..]`,
     `Q = S Wq, K = S Wk, V = S Wv` (pre-LN towers apply the layer norm to S first).
   - 'qk_v' (the paper's design; needs the AP prompt and n = 2 = the number of AP tokens):
     `Q = [x_0 ; AP ; x_1..] Wq`, `K = [x_0 ; AP ; x_1..] Wk`, `V = [x_0 ; Z ; x_1..] Wv`,
     `softmax(Q K^T / sqrt(d_head) + mask) V` per head: the AP tokens decide where attention
     goes, the modality prompts what is read there. The prompt rows' residual stream (and
     their output, `prev` of the next layer) carries the AP tokens.
   After layer J-1 the prompt rows' outputs go on through the later layers as plain tokens.
   Without AP (`ap_prompt=False`) the rows are just `Z` (MaPLe / CoOp-style baselines).
   `layer0_in_input` (the released code) places layer 0's rows in the towers' inputs
   instead: text rows overwrite report tokens 1..R before the embedding layer (they take
   those positions' embeddings; the overwritten tokens stay in the sequence masked out, so
   nothing attends them and pooling skips them), image rows join the patch tokens before
   `ln_pre` (the image tower has no positions after its embedding, so where is immaterial).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from medvlp_jax.methods.mcpl.keyword_predictor import KeywordPredictor
from medvlp_jax.methods.mcpl.keywords import ApTokenizer
from medvlp_jax.methods.mcpl.prompts import Gpcm, PromptUpdate, RelationHead
from medvlp_jax.models.heads import masked_mean
from medvlp_jax.models.layers import Dtype, dense, partitioned
from medvlp_jax.models.transformer import LayerPrompts
from medvlp_jax.models.two_tower import TwoTower

PROMPT_CONFIGS = ("qk_v", "splice")
KEYWORD_SOURCES = ("report", "predicted")
BOOL_FIELDS = (
    "image_prompts",
    "ap_prompt",
    "gpcm",
    "prompt_bias",
    "separate_ap_params",
    "ap_padding_mask",
    "layer0_context",
    "layer0_in_input",
)


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """The prompt design (`config.model` fields of the same names; hashable)."""

    prompt_depth: int = 4
    num_prompts: int = 2
    image_prompts: bool = True
    ap_prompt: bool = True
    gpcm: bool = True
    prompt_config: str = "qk_v"
    relation_dim: int = 64
    keyword_hidden: int = 256
    keyword_threshold: float = 0.5
    prompt_bias: bool = True
    update_qk_divisor: int = 1
    gpcm_nodes: int = 0
    separate_ap_params: bool = False
    ap_padding_mask: bool = True
    layer0_context: bool = False
    layer0_in_input: bool = False

    @classmethod
    def from_config(cls, model_cfg: ml_collections.ConfigDict) -> PromptOptions:
        opts = cls(**{f.name: model_cfg[f.name] for f in dataclasses.fields(cls)})
        opts.check_switches()
        if opts.prompt_config not in PROMPT_CONFIGS:
            raise ValueError(
                f"config.model.prompt_config={opts.prompt_config!r}; expected one of "
                f"{PROMPT_CONFIGS}"
            )
        if opts.prompt_depth < 0 or opts.num_prompts < 1:
            raise ValueError("config.model.prompt_depth must be >= 0 and num_prompts >= 1")
        if opts.prompt_depth and opts.prompt_config == "qk_v" and not opts.ap_prompt:
            raise ValueError(
                "config.model.prompt_config='qk_v' puts the AP tokens in query and key: it "
                "needs config.model.ap_prompt=True (or use prompt_config='splice')"
            )
        if opts.prompt_depth and opts.prompt_config == "qk_v" and opts.num_prompts != 2:
            raise ValueError(
                "config.model.prompt_config='qk_v' pairs the 2 AP tokens with the modality "
                f"prompts: it needs config.model.num_prompts=2, got {opts.num_prompts}"
            )
        return opts

    def check_switches(self) -> None:
        """The released-code switches: types, ranges, and that each one has something to
        change under the other options. Raises ValueError naming the field."""
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"config.model.{name}={getattr(self, name)!r}; expected True or False"
                )
        gpcm = self.prompt_depth > 1 and self.gpcm and self.image_prompts
        changed = lambda name: getattr(self, name) != getattr(PromptOptions, name)
        layer0 = "needs prompt_depth >= 1 and prompt_config='splice'"
        no_layer0 = not self.prompt_depth or self.prompt_config != "splice"
        problems = (
            ("update_qk_divisor", self.update_qk_divisor < 1, "must be >= 1"),
            ("relation_dim", self.relation_dim < 0, "must be >= 0 (0: D/4 per tower)"),
            (
                "gpcm_nodes",
                self.gpcm_nodes and (self.gpcm_nodes < self.num_prompts or not gpcm),
                "must be 0 or >= num_prompts, with GPCM on (gpcm, image_prompts, depth > 1)",
            ),
            (
                "prompt_bias",
                not self.prompt_bias and not (gpcm or self.uses_ap),
                "=False needs GPCM or the AP prompt (the modules it takes the bias from)",
            ),
            *(
                (name, changed(name) and not self.uses_ap, "needs the AP prompt")
                for name in ("update_qk_divisor", "separate_ap_params", "ap_padding_mask")
            ),
            *(
                (name, getattr(self, name) and no_layer0, layer0)
                for name in ("layer0_context", "layer0_in_input")
            ),
        )
        for name, bad, why in problems:
            if bad:
                raise ValueError(f"config.model.{name}={getattr(self, name)!r}: {why}")

    @property
    def rows(self) -> int:
        """R: prompt rows per prompted layer ('splice': n modality prompts + 2 AP tokens)."""
        return self.num_prompts + 2 * self.uses_ap

    @property
    def uses_ap(self) -> bool:
        return self.prompt_depth > 0 and self.ap_prompt

    @property
    def image_ap(self) -> bool:
        """Whether the image side reads AP keywords (and so needs the keyword predictor)."""
        return self.uses_ap and self.image_prompts


def _layer_dict(cls, layers, **kw) -> dict:
    return {str(c): cls(**kw) for c in layers}


class McplModel(nn.Module):
    """Frozen `TwoTower` + MCPL prompts (module docstring).

    Attributes:
      image_cfg, text_cfg, embed_dim, text_pooling: the backbone (as `TwoTower`).
      options: the prompt design.
      ap_tokens: the AP vocabulary's token table (needed when the AP prompt is on).
      dtype: compute dtype of the prompt modules and the backbone's projections (the towers
        follow their configs; params stay float32; embeddings, relations and keyword logits
        come out float32).
    """

    image_cfg: ml_collections.FrozenConfigDict
    text_cfg: ml_collections.FrozenConfigDict
    embed_dim: int
    text_pooling: str
    options: PromptOptions
    ap_tokens: ApTokenizer | None = None
    dtype: Dtype = jnp.float32

    def setup(self):
        o = self.options
        self.backbone = TwoTower(
            self.image_cfg, self.text_cfg, self.embed_dim, self.text_pooling, dtype=self.dtype
        )
        if not o.prompt_depth:
            return
        if o.uses_ap and self.ap_tokens is None:
            raise ValueError("McplModel: the AP prompt needs `ap_tokens`")
        depth_limit = min(self.text_cfg.num_layers, self.image_cfg.num_layers)
        if o.prompt_depth > depth_limit:
            raise ValueError(
                f"config.model.prompt_depth={o.prompt_depth} exceeds the towers' depth "
                f"({depth_limit})"
            )
        depth, n, deep = o.prompt_depth, o.num_prompts, range(1, o.prompt_depth)
        first = int(o.layer0_context)  # the first layer that reads text_prompts / ap_shared
        dt, dv = self.text_cfg.width, self.image_cfg.width
        joint = max(dt, dv) if o.image_prompts else dt
        prompt_init = partitioned(nn.initializers.normal(0.02), "layers", None, "embed")
        gpcm = o.gpcm and o.image_prompts
        if o.layer0_context:
            context_init = partitioned(nn.initializers.normal(0.02), None, "embed")
            self.text_context = self.param("text_context", context_init, (o.rows, dt))
            if o.image_prompts:
                self.image_context = self.param("image_context", context_init, (o.rows, dv))
        nodes = (depth - first, o.gpcm_nodes or n)
        self.text_prompts = self.param("text_prompts", prompt_init, (*nodes, joint if gpcm else dt))
        if gpcm:
            self.image_prompts = self.param("image_prompts", prompt_init, (*nodes, joint))
            self.gpcm = _layer_dict(Gpcm, deep, use_bias=o.prompt_bias, dtype=self.dtype)
        elif o.image_prompts:
            self.coupling = {
                str(c): dense(dv, ("embed", None), dtype=self.dtype) for c in range(first, depth)
            }
        if o.uses_ap:
            groups = (2,) if o.separate_ap_params else ()  # anatomy, pathology
            self.ap_shared = self.param(
                "ap_shared",
                partitioned(nn.initializers.normal(0.02), "layers", *[None] * len(groups), "embed"),
                (depth - first, *groups, joint),
            )
            update = dict(qk_divisor=o.update_qk_divisor, use_bias=o.prompt_bias, dtype=self.dtype)
            self.text_update = _layer_dict(PromptUpdate, deep, **update)
        if o.image_ap:
            self.image_update = _layer_dict(PromptUpdate, deep, **update)
            relation = dict(dim=o.relation_dim, use_bias=o.prompt_bias, dtype=self.dtype)
            self.text_relation = _layer_dict(RelationHead, deep, **relation)
            self.image_relation = _layer_dict(RelationHead, deep, **relation)
            self.ap_to_image = dense(dv, ("embed", None), dtype=self.dtype)
            self.ap_posemb = self.param(
                "ap_posemb",
                partitioned(nn.initializers.normal(0.01), "position", "embed"),
                (self.ap_tokens.length, dv),
            )
            self.keywords = KeywordPredictor(
                len(self.ap_tokens.word_ids), o.keyword_hidden, dtype=self.dtype
            )

    # ------------------------------------------------------------------ prompt pieces

    def _base_prompts(self) -> tuple[list[jax.Array], list[jax.Array]]:
        """Per layer: text prompts [n, D_text] and image prompts [n, D_vis] (step 1; with
        `layer0_context`, layer 0's are the R context rows)."""
        o = self.options
        dt, dv, n = self.text_cfg.width, self.image_cfg.width, o.num_prompts
        texts, images = [], []
        first = int(o.layer0_context)
        if first:
            texts.append(self.text_context)
            if o.image_prompts:
                images.append(self.image_context)
        for c in range(first, o.prompt_depth):
            pt = self.text_prompts[c - first]
            if not o.image_prompts:
                texts.append(pt)
            elif not o.gpcm:
                texts.append(pt)
                images.append(self.coupling[str(c)](pt))
            else:
                pi = self.image_prompts[c - first]
                if c > 0:  # rows 0:n text prompts, rows n:2n image prompts
                    pt, _ = self.gpcm[str(c)](jnp.concatenate([pt, pi]))
                    pi = pt[n:]
                texts.append(pt[:n, :dt])
                images.append(pi[:n, :dv])
        return texts, images

    def _ap_states(self, side: str, ap_ids: jax.Array, ap_mask: jax.Array) -> list[jax.Array]:
        """Hidden states of the a and p sequences entering layers 0..J-1 of `side`'s tower:
        ap_ids / ap_mask [B, 2, L] -> J arrays [B, 2, L, D] (step 2). Later layers are
        traced but unused (XLA drops them)."""
        b, _, length = ap_ids.shape
        ids, mask = ap_ids.reshape(2 * b, length), ap_mask.reshape(2 * b, length)
        if not self.options.ap_padding_mask:  # the released code: every position is a token
            mask = jnp.ones_like(mask)
        states: list[jax.Array] = []

        def record(i, hidden, prev):
            if i < self.options.prompt_depth:
                states.append(hidden.reshape(b, 2, length, -1))

        if side == "text":
            self.backbone.text_features(ids, mask, prompt_fn=record)
        else:
            x = self.ap_to_image(self.backbone.text.embed_tokens(ids))
            posemb = self.ap_posemb[:length].astype(x.dtype)
            self.backbone.image.encoder(x + posemb, mask, prompt_fn=record)
        return states

    def _prompt_fn(
        self, side: str, base: list, ap_states, ap_mask, relations: list, *, placed: bool = True
    ):
        """The tower's `prompt_fn` (steps 2-4); appends relation rows [B, n, 2L] to
        `relations` as the tower runs. `placed=False`: the layers' rows before step 4's
        placement of layer 0 (`layer0_in_input`)."""
        o = self.options
        update = getattr(self, f"{side}_update", None)
        relation = getattr(self, f"{side}_relation", None) if o.image_ap else None
        keep = ap_mask if o.ap_padding_mask else None  # [B, 2, L] or None: every position
        first = int(o.layer0_context)

        def rows(i: int, hidden: jax.Array, prev: jax.Array | None):
            if i >= o.prompt_depth:
                return None
            prompts = jnp.broadcast_to(base[i], (hidden.shape[0], *base[i].shape))
            if ap_states is None or i < first:
                return LayerPrompts(prompts.astype(hidden.dtype))
            a, p = ap_states[i][:, 0], ap_states[i][:, 1]
            group_keep = (None, None) if keep is None else (keep[:, 0], keep[:, 1])
            means = jnp.stack([masked_mean(a, group_keep[0]), masked_mean(p, group_keep[1])], 1)
            ap = self.ap_shared[i - first][..., : hidden.shape[-1]] + means  # [B, 2, D]
            if i > 0:
                keys = jnp.concatenate([a, p], axis=1)
                key_mask = None if keep is None else jnp.concatenate(group_keep, axis=1)
                context = jnp.concatenate([keys, prev], axis=1)
                context_mask = None
                if key_mask is not None:
                    prev_mask = jnp.ones(prev.shape[:2], key_mask.dtype)
                    context_mask = jnp.concatenate([key_mask, prev_mask], axis=1)
                prompts = update[str(i)](prompts, context, context_mask)
                if relation is not None:
                    relations.append(relation[str(i)](prompts, keys, key_mask))
            if o.prompt_config == "qk_v":
                return LayerPrompts(ap.astype(hidden.dtype), values=prompts.astype(hidden.dtype))
            return LayerPrompts(jnp.concatenate([prompts, ap], axis=1).astype(hidden.dtype))

        def prompt_fn(i: int, hidden: jax.Array, prev: jax.Array | None):
            if i or not o.layer0_in_input:
                return rows(i, hidden, prev)
            if side == "text":  # `_overwrite_report` wrote the rows over tokens 1..R
                return LayerPrompts(hidden[:, 1 : 1 + o.rows])
            return LayerPrompts(self.backbone.image.ln_pre(rows(0, hidden, None).tokens))

        return prompt_fn if placed else rows

    def _overwrite_report(self, rows, input_ids: jax.Array, attention_mask: jax.Array):
        """`layer0_in_input`, text side: layer 0's rows (`rows(0, ...)` [B, R, D]) written over
        the token embeddings of report tokens 1..R -> (inputs_embeds [B, T, D], attention
        mask [B, T] with those tokens off)."""
        r = self.options.rows
        if input_ids.shape[1] < r + 2:
            raise ValueError(
                f"config.model.layer0_in_input: reports of {input_ids.shape[1]} tokens leave "
                f"no room for {r} prompt rows after the first token"
            )
        embeds = self.backbone.text.embed_tokens(input_ids)
        tokens = rows(0, embeds, None).tokens.astype(embeds.dtype)
        mask = jnp.asarray(attention_mask).at[:, 1 : 1 + r].set(0)
        return embeds.at[:, 1 : 1 + r].set(tokens), mask

    @staticmethod
    def _stack(relations: list) -> jax.Array | None:
        return jnp.concatenate(relations, axis=1) if relations else None

    # ------------------------------------------------------------------ entry points

    def keyword_logits(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> keyword logits [B, V] from frozen, un-prompted features."""
        features = self.backbone.image_features(images)["pooler_output"]
        return self.keywords(jax.lax.stop_gradient(features))

    def embed_images(
        self,
        images: jax.Array,
        ap_ids: jax.Array | None = None,
        ap_mask: jax.Array | None = None,
        *,
        keywords: str = "report",
    ) -> tuple[jax.Array, jax.Array | None]:
        """images [B, H, W, C] (+ the report's AP sequences [B, 2, L]) -> (embeddings [B, E],
        relations [B, n(J-1), 2L] or None). `keywords='predicted'` ignores ap_ids/ap_mask and
        uses the keyword predictor's words (image-only inference)."""
        fn, relations = self._image_prompt_fn(images, ap_ids, ap_mask, keywords)
        if fn is None:
            return self.backbone.embed_images(images), None
        return self.backbone.embed_images(images, prompt_fn=fn), self._stack(relations)

    def image_pyramid(
        self,
        images: jax.Array,
        ap_ids: jax.Array | None = None,
        ap_mask: jax.Array | None = None,
        *,
        keywords: str = "report",
    ) -> tuple[jax.Array, ...]:
        """The prompted image tower's `pyramid` (feature maps [B, h, w, C], fine to coarse;
        the last one is the prompted patch tokens), keywords as in `embed_images`."""
        fn, _ = self._image_prompt_fn(images, ap_ids, ap_mask, keywords)
        kw = {} if fn is None else {"prompt_fn": fn}
        return self.backbone.image_features(images, **kw)["pyramid"]

    def _image_prompt_fn(self, images, ap_ids, ap_mask, keywords: str):
        """(the image tower's prompt_fn, or None without image prompts; the list it appends
        relation scores to)."""
        o = self.options
        if keywords not in KEYWORD_SOURCES:
            raise ValueError(f"keywords={keywords!r}; expected one of {KEYWORD_SOURCES}")
        relations: list = []
        if not (o.prompt_depth and o.image_prompts):
            return None, relations
        _, base = self._base_prompts()
        states = None
        if o.image_ap:
            if keywords == "predicted":
                probs = jax.nn.sigmoid(self.keyword_logits(images))
                ap_ids, ap_mask = self.ap_tokens.sequences(probs > o.keyword_threshold)
            states = self._ap_states("image", ap_ids, ap_mask)
        return self._prompt_fn("image", base, states, ap_mask, relations), relations

    def embed_texts(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        ap_ids: jax.Array | None = None,
        ap_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """input_ids / attention_mask [B, T] (+ AP sequences [B, 2, L]) -> (embeddings [B, E],
        relations [B, n(J-1), 2L] or None)."""
        o = self.options
        if not o.prompt_depth:
            return self.backbone.embed_texts(input_ids, attention_mask), None
        base, _ = self._base_prompts()
        states = self._ap_states("text", ap_ids, ap_mask) if o.uses_ap else None
        relations: list = []
        kw = {"prompt_fn": self._prompt_fn("text", base, states, ap_mask, relations)}
        if o.layer0_in_input:
            rows = self._prompt_fn("text", base, states, ap_mask, relations, placed=False)
            kw["inputs_embeds"], attention_mask = self._overwrite_report(
                rows, input_ids, attention_mask
            )
        z = self.backbone.embed_texts(input_ids, attention_mask, **kw)
        return z, self._stack(relations)

    def __call__(self, images, input_ids, attention_mask, ap_ids=None, ap_mask=None) -> dict:
        """Training forward: images use the report's keywords. Returns {'zimg', 'ztxt'
        [B, E], 'r_img', 'r_txt' [B, n(J-1), 2L] or None, 'keyword_logits' [B, V] or None}."""
        zimg, r_img = self.embed_images(images, ap_ids, ap_mask)
        ztxt, r_txt = self.embed_texts(input_ids, attention_mask, ap_ids, ap_mask)
        logits = self.keyword_logits(images) if self.options.image_ap else None
        return {
            "zimg": zimg,
            "ztxt": ztxt,
            "r_img": r_img,
            "r_txt": r_txt,
            "keyword_logits": logits,
        }
