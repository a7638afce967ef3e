"""MCPL (Wang et al., IEEE TMI 2024): multi-modal collaborative prompt learning on a frozen
CLIP-style backbone (the model is described in `model.py`).

Trainable: the prompts, GPCM, prompt-update attentions, relation heads, the AP projection and
positional table, and the keyword predictor; the backbone (`params/backbone`) is frozen, so the
trainer gives it no optimizer state. Loss:

    InfoNCE(zimg, ztxt) at fixed temperature `model.temperature` (0.01)
    + relation_weight * 2 * mean|R_img - R_txt|          (relation consistency)
    + keyword_weight * BCE(keyword predictor, report keywords)   (touches only the predictor)

The frozen backbone always runs deterministically (no dropout), in training too. During
training the image side reads the report's AP keywords; the evaluators' image
embeddings read the keyword predictor's words (`model.eval_image_keywords='predicted'`), so no
report leaks into zero-shot, retrieval or probe features.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from medvlp_jax import precision
from medvlp_jax.data import tokenize
from medvlp_jax.losses.contrastive import clip_loss
from medvlp_jax.losses.prompts import relation_consistency_loss
from medvlp_jax.methods.base import Method
from medvlp_jax.methods.mcpl import backbone
from medvlp_jax.methods.mcpl.keyword_predictor import keyword_loss
from medvlp_jax.methods.mcpl.keywords import ApTokenizer, KeywordHook, load_vocab
from medvlp_jax.methods.mcpl.model import KEYWORD_SOURCES, McplModel, PromptOptions


def default_model_config() -> ml_collections.ConfigDict:
    """`config.model` fields of MCPL and their defaults (configs/mcpl.py sets them)."""
    m = ml_collections.ConfigDict()
    m.prompt_depth = 4  # J: layers 0..J-1 carry prompts; 0 = the bare backbone
    m.num_prompts = 2  # modality prompt tokens per layer and tower
    m.image_prompts = True  # False: text prompts only (CoOp-style with prompt_depth=1)
    m.ap_prompt = True  # anatomy-pathology tokens, prompt update and relation loss
    m.gpcm = True  # GPCM prompt production; False: MaPLe's linear text->image coupling
    m.prompt_config = "qk_v"  # 'qk_v' (paper) | 'splice' (released code)
    m.relation_dim = 64  # d_r of the relation heads; 0 = D/4 of each tower (released)
    m.keyword_hidden = 256  # keyword predictor hidden width (0 = linear)
    m.keyword_threshold = 0.5
    m.temperature = 0.01
    m.relation_weight = 1.0
    m.keyword_weight = 1.0
    m.ap_vocab = ""  # '' = the published lists (medvlp_jax/data/mcpl_ap_vocab.json)
    m.ap_max_len = 32  # L, tokens per AP sequence
    m.eval_image_keywords = "predicted"  # 'predicted' | 'report' (leaks the report)
    # The released code's computation, one switch per difference (configs/mcpl.py:original
    # sets them all; docs/fidelity.md). Our defaults follow the paper or fix what the
    # released code does by accident.
    # GPCM, prompt update and relation heads with biases; False: none (released). Ours keeps
    # them as ordinary Dense layers; nothing in the paper asks to drop them.
    m.prompt_bias = True
    # The prompt update's q, k project D -> D / divisor (released: 4, q.k still scaled by
    # 1/sqrt(D)). Ours keeps the full width: the update reads L-token keyword sequences,
    # and D/4 with the D-scale only flattens its attention.
    m.update_qk_divisor = 1
    # GPCM nodes per modality (0 = num_prompts). Released: 16, read as rows 0:n (text) and
    # n:2n (image), i.e. the image prompts come from text nodes and 2(16 - n) nodes are
    # only mixed in; ours has exactly the n text + n image nodes it reads (the paper's graph).
    m.gpcm_nodes = 0
    # One learned AP vector per layer for both AP tokens (the paper's shared_param_c);
    # True: separate anatomy and pathology vectors (released), still shared by both towers.
    m.separate_ap_params = False
    # The AP sequences' padding is masked in the towers, in the keyword means and in the
    # update's and relation's keys; False (released): every one of the L positions counts,
    # padding included, so short keyword lists are averaged mostly over pad tokens.
    m.ap_padding_mask = True
    # Layer 0 carries the n modality prompts + the 2 AP tokens, like every prompted layer;
    # True (released): R = n + 2 free context vectors per tower, no keywords at layer 0.
    m.layer0_context = False
    # Layer 0's rows are extra tokens after the first one (no positional embedding); True
    # (released): text rows overwrite report tokens 1..R before the embedding (losing
    # those words), image rows join the patches before ln_pre. Needs prompt_config='splice'.
    m.layer0_in_input = False
    return m


class Mcpl(Method):
    """Prompt learning on a frozen two-tower backbone; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        if m.eval_image_keywords not in KEYWORD_SOURCES:
            raise ValueError(
                f"config.model.eval_image_keywords={m.eval_image_keywords!r}; expected one of "
                f"{KEYWORD_SOURCES}"
            )
        self.options = PromptOptions.from_config(m)
        self.vocab = load_vocab(m.ap_vocab) if self.options.uses_ap else None
        # The backbone's towers compute in train.compute_dtype unless their configs set a dtype.
        spec = backbone.describe(config)
        self.spec = dataclasses.replace(
            spec,
            image=precision.resolve_tower(spec.image, config),
            text=precision.resolve_tower(spec.text, config),
        )
        tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
        self.model = McplModel(
            self.spec.image,
            self.spec.text,
            self.spec.embed_dim,
            self.spec.text_pooling,
            self.options,
            self._ap_tokens(tokenizer),
            precision.compute_dtype(config),
        )

    def _ap_tokens(self, tokenizer) -> ApTokenizer | None:
        if self.vocab is None:
            return None
        return ApTokenizer.create(tokenizer, self.vocab, self.config.model.ap_max_len)

    def data_hooks(self, tokenizer) -> tuple:
        if self.vocab is None:
            return ()
        return (KeywordHook(self.vocab, self._ap_tokens(tokenizer)),)

    def init(self, rng, batch):
        return self.model.init(
            {"params": rng},
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("ap_ids"),
            batch.get("ap_mask"),
        )

    def importers(self):
        # A Hugging Face CLIP folder as the whole backbone (see `backbone`).
        return {"backbone": lambda source: backbone.import_hf_clip(self.spec, source)}

    def group_rules(self) -> tuple[str, ...]:
        return ("backbone/.* -> frozen",)

    def loss(self, variables, batch, rng, train):
        m = self.config.model
        out = self.model.apply(
            variables,
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("ap_ids"),
            batch.get("ap_mask"),
        )
        loss, metrics = clip_loss(out["zimg"], out["ztxt"], 1.0 / m.temperature)
        metrics = {**metrics, "loss_clip": loss}
        if out["r_img"] is not None:
            relation = relation_consistency_loss(out["r_img"], out["r_txt"])
            loss = loss + m.relation_weight * relation
            metrics["loss_relation"] = relation
        if out["keyword_logits"] is not None:
            keyword, keyword_metrics = keyword_loss(out["keyword_logits"], batch["ap_labels"])
            loss = loss + m.keyword_weight * keyword
            metrics.update(keyword_metrics)
        return loss, metrics, {}

    def _image_side(self, variables, batch, model_method):
        """`model_method` (an image entry point of McplModel) on the batch's images, with the
        evaluation keywords (`model.eval_image_keywords`)."""
        return self.model.apply(
            variables,
            batch["image"],
            batch.get("ap_ids"),
            batch.get("ap_mask"),
            keywords=self.config.model.eval_image_keywords,
            method=model_method,
        )

    def embed_images(self, variables, batch):
        return self._image_side(variables, batch, McplModel.embed_images)[0]

    def feature_pyramid(self, variables, batch):
        """The prompted image tower's feature maps (`McplModel.image_pyramid`)."""
        return self._image_side(variables, batch, McplModel.image_pyramid)

    def embed_texts(self, variables, batch):
        z, _ = self.model.apply(
            variables,
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("ap_ids"),
            batch.get("ap_mask"),
            method=McplModel.embed_texts,
        )
        return z
