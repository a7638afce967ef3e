"""MCPL: multi-modal collaborative prompt learning on a frozen CLIP-style backbone.

The backbone: `config.prerequisites.backbone` is a complete configs/clip.py run config. With
`init.backbone.source='run:backbone'` (the default) MCPL starts from that CLIP baseline
pre-trained on SynthCXR, which the trainer pre-trains into the cache on first use
(`<cache>/runs/backbone-<hash>`, see medvlp_jax/prerequisites.py);
`--config.init.backbone.source=<HF CLIP folder>` (e.g. openai/clip-vit-base-patch16, with
`--config.data.tokenizer=<same folder>`) or `=<a CLIP run's workdir>` takes those weights.

Presets (`--config=configs/mcpl.py:PRESET`; presets combine with commas, e.g. 'tiny,original'):
  ''    CPU-sized: the configs/clip.py:vit backbone (MCPL's prompts need a ViT: a hybrid one,
        whose ResNet-50 trunk makes the tokens, learns SynthCXR within this budget where a
        patch ViT does not; ~15 min to pre-train on 2 cores, once), then a short prompt tuning;
        `bench quality` runs the ablation variants below.
  tiny  tests and CI: configs/clip.py:tiny backbone trained for a few steps, tiny prompts.
  base  the published optimisation (SGD, batch 64, 224 px); meant for a ViT-B/16 CLIP
        passed with --config.init.backbone.source (else configs/clip.py:base is pre-trained first).
  original  the released code's computation (CUHK-AIM-Group/MCPL, `mcpl.py`): spliced prompts,
        GPCM over 16 + 16 nodes, bias-free D/4 projections, separate anatomy / pathology
        vectors, unmasked keyword padding (sequences as long as the reports), free context
        rows overwriting report tokens 1-4 at layer 0; SGD with its warm-up + cosine schedule
        on every parameter, no gradient clipping. See docs/fidelity.md.
"""

from pathlib import Path

from medvlp_jax.config import base_config, load_config_file
from medvlp_jax.methods.mcpl.method import default_model_config
from medvlp_jax.weights import load_spec

CLIP_CONFIG = Path(__file__).with_name("clip.py")
PRESETS = ("tiny", "base", "original")
ORIGINAL = dict(
    prompt_config="splice",
    prompt_bias=False,
    update_qk_divisor=4,
    relation_dim=0,
    gpcm_nodes=16,
    separate_ap_params=True,
    ap_padding_mask=False,
    layer0_context=True,
    layer0_in_input=True,
)
# The released optimiser: SGD with momentum 0.9 (lr 2e-3, wd 0.05 as our default), a linear
# warm-up from 5e-6 over 10% of the steps, then cosine to 5e-6.
RELEASED_SGD = dict(name="sgd", momentum=0.9, warmup_init_lr=5e-6, end_lr=5e-6)

ABLATIONS = (
    "backbone:model.prompt_depth=0;train.num_steps=0",
    "coop:model.prompt_depth=1;model.image_prompts=false;model.ap_prompt=false;"
    "model.gpcm=false;model.prompt_config=splice",
    "maple:model.ap_prompt=false;model.gpcm=false;model.prompt_config=splice",
    "mcpl_splice:model.prompt_config=splice",
    "mcpl_qk_v:model.prompt_config=qk_v",
)


def get_config(arg: str = ""):
    presets = {p for p in arg.split(",") if p}
    unknown = sorted(presets - set(PRESETS))
    if unknown or {"tiny", "base"} <= presets:
        raise ValueError(
            f"unknown preset(s) {unknown or arg!r} for configs/mcpl.py; use '' or any of "
            f"{PRESETS} ('tiny' and 'base' exclude each other), joined by commas"
        )
    size = "tiny" if "tiny" in presets else "base" if "base" in presets else ""
    c = base_config()
    c.method = "mcpl"
    backbone = load_config_file(f"{CLIP_CONFIG}:{size or 'vit'}")
    c.prerequisites.backbone = backbone
    c.init.backbone = load_spec("run:backbone", into="backbone")
    c.data = backbone.data.copy_and_resolve_references()
    c.model = default_model_config()
    c.evals = backbone.evals.copy_and_resolve_references()

    # CPU budget: `bench quality` tunes 4 variants after the backbone, so each gets ~1 epoch
    # of SynthCXR (60 steps of 32) and a lighter evaluation than configs/clip.py's.
    c.optim.name = "adamw"
    c.optim.lr = 2e-3
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = 6
    c.train.num_steps = 60
    c.train.eval_every = 60
    c.train.checkpoint_every = 30
    c.evals.retrieval.max_examples = 500
    c.evals.linear_probe.max_train_examples = 1000
    c.bench.variants = ABLATIONS

    if size == "tiny":
        # a backbone that merely exists (2 steps, no evaluation): tests share it
        backbone = c.prerequisites.backbone
        backbone.train.num_steps = 2
        backbone.train.eval_every = 2
        backbone.train.checkpoint_every = 2
        for name in ("zero_shot", "retrieval", "linear_probe"):
            backbone.evals[name].enabled = False
        c.model.prompt_depth = 2
        c.model.relation_dim = 8
        c.model.keyword_hidden = 16
        c.model.ap_max_len = 24
        c.optim.warmup_steps = 1
        c.train.num_steps = 2
        c.train.log_every = 1
        c.train.eval_every = 2
        c.train.checkpoint_every = 1
    elif size == "base":
        # The published optimisation: SGD, warm-up 10% from 5e-6, cosine to 5e-6, batch 64,
        # 10 epochs (set train.num_steps to 10 epochs of your data).
        c.data.batch_size = 64
        c.optim.update(RELEASED_SGD)
        c.train.num_steps = 5000
        c.optim.warmup_steps = 500
        c.train.eval_every = 1000
        c.train.checkpoint_every = 500
    if "original" in presets:
        c.model.update(ORIGINAL)
        # The keyword sequences are as long as the reports (CLIP's 77 tokens in the released
        # code): with unmasked padding this length sets how much padding the means take in.
        c.model.ap_max_len = c.data.max_text_len
        c.optim.update(RELEASED_SGD)
        c.optim.warmup_steps = c.train.get_ref("num_steps") // 10
        c.optim.no_decay = ()  # torch SGD decays every parameter, biases and norms included
        c.optim.clip_grad_norm = 0.0  # Lightning's default: no clipping
        c.bench.variants = ()  # `bench quality` runs the preset itself (the ablations set
        # `prompt_config`, which the released computation fixes)
    return c
