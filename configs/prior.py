"""PRIOR on SynthCXR: ResNet-50 (1-channel stem) + BERT-family text tower, three stages.

Stages (`train.stages`, boundaries in steps; a fresh AdamW state and warm-up + cosine each):
  align           L_g + L_li + L_lt
  prototypes      + 10 L_q (sentence embeddings replaced by their prototypes)
  reconstruction  10 L_g + L_li + L_lt + L_img + 10 L_spg + L_kl + L_gpa + 10 L_q

Presets (`--config=configs/prior.py:PRESET`; presets combine with commas, e.g. 'tiny,original'):
  ''        CPU-sized: ResNet-50 from scratch at 64 px (2 x 2 regions), the pre-trained MiniLM
            text tower (embeddings and first 4 layers frozen, as configs/clip.py), E = 256,
            a 2-layer slot decoder, 120 + 40 + 40 steps of 32.
  tiny      tests and CI: a tiny ViT (32 px, 4 x 4 regions) and a tiny BERT, 3 x 2 steps.
  original  the released code's behaviour: NCHW-flattened local tokens, a causal slot decoder,
            the slot index `col` for `argsort(col)`, zero-padded prototypes in the matching
            cost and L1, Gumbel noise in the bank at evaluation, no clamp on the scales.
  paper     the published sizes (224 px, E = 768, 8-layer decoder, K = 512, batch 98 per
            GPU; lr 1e-5 / 1e-5 / 5e-6); set the stage steps to 20 / 30 / 100 epochs of your
            data and the towers' sources (torchvision ResNet-50, a BERT folder).
"""

from medvlp_jax.config import base_config
from medvlp_jax.methods.prior.method import default_model_config
from medvlp_jax.models.builders import tower_config
from medvlp_jax.stages import stage
from medvlp_jax.weights import load_spec

PRESETS = ("tiny", "original", "paper")
ORIGINAL = dict(
    nchw_local_tokens=True,
    causal_decoder=True,
    faithful_matching_index=True,
    matching_includes_padding=True,
    gumbel_at_eval=True,
    clamp_logit_scale=False,
)


def _stages(c, steps: tuple[int, int, int], lrs: tuple[float, float, float], warmup: int):
    c.train.stages = ("align", "prototypes", "reconstruction")
    c.train.num_steps = 0
    full = dict(prototypes=True, reconstruction=True, global_weight=10.0)
    models = (dict(), dict(prototypes=True), full)
    for name, n, lr, model in zip(c.train.stages, steps, lrs, models, strict=True):
        c.stages[name] = stage(n, optim=dict(lr=lr, warmup_steps=warmup), model=model)


def get_config(arg: str = ""):
    presets = {p for p in arg.split(",") if p}
    unknown = sorted(presets - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown} for configs/prior.py; use {PRESETS}")
    c = base_config()
    c.method = "prior"
    c.model = default_model_config()
    c.model.image = tower_config("resnet50")
    c.model.text = tower_config("bert", "minilm")
    c.init.image = load_spec("", into="image")  # e.g. a torchvision resnet50.safetensors
    c.init.text = load_spec("minilm", into="text")

    c.data.channels = 1  # the 1-channel stem (a pre-trained RGB stem is summed over channels)
    c.data.sections = ("findings", "impression")  # sentences: findings carry the most
    c.data.section_mode = "concat"
    c.data.image_size = 64
    c.data.max_text_len = 96
    c.data.batch_size = 32
    c.model.embed_dim = 256
    # From scratch the released init of 100 collapses the image embeddings within 20 steps
    # (L_g pinned at log B from step 20, measured); CLIP's 1 / 0.07 as configs/clip.py.
    c.model.logit_scale_init = 1 / 0.07
    c.model.max_sentences = 16
    c.model.num_prototypes = 128
    c.model.decoder_layers = 2
    c.model.decoder_heads = 4
    c.model.decoder_mlp_dim = 1024

    c.optim.name = "adamw"
    c.optim.weight_decay = 1e-6
    c.optim.schedule = "cosine"
    c.optim.groups = (
        r"text/(word_embeddings|position_embeddings|token_type_embeddings|embed_norm)/.* -> frozen",
        r"text/encoder/layer_[0-3]/.* -> frozen",
        "text/.* -> lr=0.1",
    )
    _stages(c, (120, 40, 40), (1e-3, 5e-4, 2.5e-4), warmup=10)
    c.train.eval_every = 200
    c.train.checkpoint_every = 40
    c.train.refresh_batch_stats = 30

    c.evals.zero_shot.templates = ("{} is observed",)
    c.evals.zero_shot.pred = dict(image="embed_image", text="class_text", score="class_score")

    if "paper" in presets:
        c.data.image_size = 224
        c.data.max_text_len = 256
        c.data.batch_size = 98
        c.model.update(default_model_config().to_dict())
        c.model.image = tower_config("resnet50")
        c.model.text = tower_config("bert", "base")
        c.init.text.source = ""
        c.optim.groups = ()
        c.optim.warmup_init_lr = 1e-7
        _stages(c, (2000, 3000, 10000), (1e-5, 1e-5, 5e-6), warmup=100)
        c.train.eval_every = 1000
        c.train.checkpoint_every = 1000
    if "tiny" in presets:
        c.data.synthcxr.num_studies = 200
        c.data.synthcxr.image_size = 64
        c.data.synthcxr.zero_shot_per_class = 4
        c.data.image_size = 32
        c.data.max_text_len = 48
        c.data.batch_size = 16
        c.data.eval_batch_size = 32
        c.model.image = tower_config("vit", "tiny")
        c.model.image.proj_dim = 0
        c.model.text = tower_config("bert", "tiny")
        c.model.text.vocab_size = 30522  # the MiniLM tokenizer's vocabulary
        c.model.text.dropout_rate = 0.0
        c.model.text.attention_dropout_rate = 0.0
        c.init.text.source = ""
        c.optim.groups = ()
        c.model.embed_dim = 32
        c.model.pool_heads = 4
        c.model.max_sentences = 8
        c.model.num_queries = 8
        c.model.num_prototypes = 16
        c.model.decoder_layers = 1
        c.model.decoder_heads = 2
        c.model.decoder_mlp_dim = 64
        _stages(c, (2, 2, 2), (1e-3, 1e-3, 5e-4), warmup=1)
        c.train.log_every = 1
        c.train.eval_every = 6
        c.train.checkpoint_every = 2
        c.train.refresh_batch_stats = 0
        c.evals.retrieval.max_examples = 64
        c.evals.linear_probe.steps = 30
    if "original" in presets:
        c.model.update(ORIGINAL)
    if c.model.image.name == "vit":
        c.model.image.image_size = c.data.get_ref("image_size")
    c.model.image.channels = c.data.get_ref("channels")
    return c
