"""PTUnifier on SynthCXR: a hybrid ViT and MiniLM, co-attention fusion, prompt pools,
MLM + ITM + ITC.

Towers. As the paper starts from CLIP's ViT and RoBERTa, the image tower starts from a CLIP
run on the same data: `config.prerequisites.backbone` (`backbone_config()`: the CLIP baseline
with the hybrid ViT of `configs/clip.py:vit`, widened to 384 so that its embeddings can query
the textual pool), which the trainer pre-trains into the cache on first use
(`<cache>/runs/backbone-<hash>`, ~20 min on 2 cores); `init.image` takes its image tower
(`--config.init.image.source=''` starts from scratch; an HF CLIP folder or a CLIP run's
workdir also fit). The text tower is the pre-trained MiniLM.

Presets (`--config=configs/ptunifier.py:PRESET`):
  ''        the default at CPU size: that hybrid ViT at 64 px (16 patch tokens), MiniLM,
            32 tokens; 6 co-attention layers of width 128; pools of 256 rows per modality
            (the pool-size study in the README), k = 16 visual and 32 textual prompts;
            learnable pools, ITC on; 80 steps of 32 (~13 s a step on 2 cores: MLM, ITM and
            both ITC paths through the fusion every step).
  tiny      tests and CI: one-layer tiny towers and fusion from scratch, 32 px, 200 studies,
            12 steps.
  original  the released code's behaviour on the default's model (docs/fidelity.md): one
            random sentence of the report per example and epoch, frozen pools, ITC off
            (1 x MLM + 0.5 x ITM), padding as an MLM candidate, the ViT's last block dropped
            (and not loaded), AdamW (0.9, 0.98) wd 0.01, 10% warm-up then linear decay to 0,
            x5 lr on heads, fusion and pools, no gradient clipping (the base lr stays ours:
            the released 1e-5 is for 100k steps from pre-trained towers).

The published setting (ViT-B/16 CLIP weights at 288 px, RoBERTa-base, 768-wide fusion, pools
of 2048 rows with k = 49 / 32, batch 256, 100k steps at lr 1e-5) needs real data and an
accelerator: `init.image.source` / `init.text.source` (HF CLIP and RoBERTa folders),
`data.tokenizer`, and `model.image` / `model.text` / `model.fusion` sized like them.
"""

from pathlib import Path

from medvlp_jax.config import base_config, load_config_file
from medvlp_jax.models.builders import tower_config
from medvlp_jax.weights import load_spec

CLIP_CONFIG = Path(__file__).with_name("clip.py")


def backbone_config():
    """The image tower's pre-training run: the CLIP baseline with the hybrid ViT of
    `configs/clip.py:vit`, 384 wide (6 heads) so that its embeddings can query the textual
    pool (MiniLM's width)."""
    backbone = load_config_file(f"{CLIP_CONFIG}:vit")
    backbone.model.image.update(width=384, num_heads=6, mlp_dim=1536)
    return backbone


def get_config(arg: str = ""):
    c = base_config()
    c.method = "ptunifier"
    # The image tower starts from a CLIP run on the same data, as the paper starts from
    # CLIP-ViT weights (the text tower from MiniLM, as the paper's from RoBERTa).
    c.prerequisites.backbone = backbone_config()
    only_image_tower = (r"image/(.*) -> \1", r".* ->")
    c.init.image = load_spec("run:backbone", into="image", map=only_image_tower)
    c.init.text = load_spec("minilm", into="text")

    c.data.sections = ("impression", "findings")  # as configs/clip.py
    c.data.image_size = 64
    c.data.max_text_len = 32
    c.data.batch_size = 32

    m = c.model
    m.image = c.prerequisites.backbone.model.image.copy_and_resolve_references()
    m.drop_last_image_block = False
    m.text = tower_config("bert", "minilm")
    m.text.dropout_rate = 0.0
    m.text.attention_dropout_rate = 0.0
    m.fusion = dict(
        width=128,
        num_layers=6,
        num_heads=4,
        mlp_dim=512,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
        layer_norm_eps=1e-12,  # the released fusion layers take the text model's
    )
    # Prompt pools: rows per pool (0 = no prompts: a missing modality is its class token(s));
    # visual_pool_size / text_pool_size -1 = pool_size.
    m.pool_size = 256
    m.visual_pool_size = -1
    m.text_pool_size = -1
    m.num_visual_prompts = 16
    m.num_text_prompts = 32
    m.prompt_similarity = "dot"  # or "cosine"
    m.freeze_pools = False  # True: the released code (selection under no_grad)
    m.hard_negatives = False  # ITM negatives from the ITC similarities
    m.mlm_prob = 0.15
    m.mlm_mask_padding = False  # True: the released code (padding is a masking candidate)
    m.itc_enabled = True  # False: the released code (a key typo never runs ITC)
    m.itc_temperature = 0.1
    m.mlm_weight = 1.0
    m.itm_weight = 0.5
    m.itc_weight = 0.1
    m.lr_multiplier = 5.0  # heads, fusion and pools, as released

    c.optim.lr = 2e-4
    c.optim.warmup_steps = 10
    c.optim.groups = ("text/.* -> lr=0.1",)  # gentler on the pre-trained text tower
    c.train.num_steps = 80
    c.train.eval_every = 80
    c.train.checkpoint_every = 40
    c.train.refresh_batch_stats = 30  # the hybrid stem's batch norms (see configs/clip.py)
    c.evals.retrieval.rerank_k = 10
    c.evals.retrieval.pred = {"image": "embed_image", "text": "embed_text", "pair": "pair_score"}
    c.evals.linear_probe.pred = {"features": "image_features"}
    c.evals.text_probe = c.evals.linear_probe.copy_and_resolve_references()
    c.evals.text_probe.pred = {"features": "text_features"}

    if arg == "tiny":
        c.data.synthcxr.num_studies = 200
        c.data.synthcxr.image_size = 64
        c.data.synthcxr.zero_shot_per_class = 4
        c.data.image_size = 32
        c.data.max_text_len = 32
        c.data.batch_size = 16
        c.data.eval_batch_size = 32
        m.image = tower_config("vit", "tiny")
        m.text = tower_config("bert", "tiny")
        m.text.vocab_size = 30522  # the MiniLM tokenizer's vocabulary
        del c.prerequisites["backbone"]  # the prerequisite path is MCPL's tiny test's
        c.init.image.update(source="", map=())
        c.init.text.source = ""
        # One layer per tower and in the fusion: its step compiles 4 fusion and 3 tower paths.
        m.image.num_layers = 1
        m.text.num_layers = 1
        m.fusion.update(width=32, num_layers=1, num_heads=4, mlp_dim=64)
        m.pool_size = 16
        m.num_visual_prompts = 4
        m.num_text_prompts = 4
        c.optim.warmup_steps = 2
        c.optim.groups = ()
        c.train.num_steps = 12
        c.train.log_every = 4
        c.train.eval_every = 12
        c.train.checkpoint_every = 6
        c.train.refresh_batch_stats = 0
        c.evals.retrieval.max_examples = 48
        c.evals.retrieval.rerank_k = 4
        for probe in (c.evals.linear_probe, c.evals.text_probe):
            probe.steps = 20
            probe.fractions = (1.0,)
    elif arg == "original":
        c.data.train_text = "random_sentence"
        m.drop_last_image_block = True
        last = m.image.num_layers - 1
        c.init.image.map = (rf"image/encoder/layer_{last}/.* ->", *c.init.image.map)
        m.freeze_pools = True
        m.mlm_mask_padding = True
        m.itc_enabled = False
        c.optim.b2 = 0.98
        c.optim.weight_decay = 0.01
        c.optim.schedule = "linear"
        c.optim.warmup_steps = c.train.num_steps // 10  # 10% (set it with num_steps)
        c.optim.end_lr = 0.0
        c.optim.clip_grad_norm = 0.0
    elif arg:
        raise ValueError(
            f"unknown preset {arg!r} for configs/ptunifier.py; use '', 'tiny' or 'original'"
        )
    m.image.image_size = c.data.get_ref("image_size")
    m.image.channels = c.data.get_ref("channels")
    return c
