"""CLIP / ConVIRT baseline on SynthCXR: ViT image tower, MiniLM text tower, InfoNCE.

Presets (`--config=configs/clip.py:PRESET`):
  ''    the default: a CPU-sized run (96 px ViT, pre-trained MiniLM text tower) that learns
        SynthCXR in ~10-15 minutes on 2 quiet cores; `bench quality` uses it.
  tiny  tests and CI: tiny towers, 32 px, 200 studies, 20 steps (< 1 minute).
  base  ViT-B/16 at 224 px + BERT-base-sized text, for accelerators with real data.
"""

from medvlp_jax.config import base_config
from medvlp_jax.models.builders import tower_config


def get_config(arg: str = ""):
    c = base_config()
    c.method = "clip"
    c.model.loss = "clip"
    c.model.learn_temperature = True
    c.model.temperature = 0.07
    c.model.memory_light = False
    c.model.text_pooling = "mean"
    c.model.embed_dim = 256
    c.model.image_init = ""
    c.model.text_init = "minilm"

    c.data.image_size = 96
    c.data.max_text_len = 48
    c.data.batch_size = 32
    c.model.image = tower_config("vit", "tiny")
    c.model.image.update(width=256, num_layers=4, num_heads=4, mlp_dim=1024, patch_size=16)
    c.model.text = tower_config("bert", "minilm")
    c.model.text.dropout_rate = 0.0
    c.model.text.attention_dropout_rate = 0.0

    c.optim.lr = 1e-4
    c.optim.lr_multipliers = ("text/.*=0.2",)  # gentler on the pre-trained text tower
    c.optim.warmup_steps = 20
    c.train.num_steps = 200
    c.train.eval_every = 200
    c.train.checkpoint_every = 50

    if arg == "tiny":
        c.data.synthcxr.num_studies = 200
        c.data.synthcxr.image_size = 64
        c.data.synthcxr.zero_shot_per_class = 4
        c.data.image_size = 32
        c.data.max_text_len = 32
        c.data.batch_size = 16
        c.data.eval_batch_size = 32
        c.model.embed_dim = 16
        c.model.image = tower_config("vit", "tiny")
        c.model.text = tower_config("bert", "tiny")
        c.model.text.vocab_size = 30522  # the MiniLM tokenizer's vocabulary
        c.model.text_init = ""
        c.optim.warmup_steps = 2
        c.train.num_steps = 20
        c.train.log_every = 5
        c.train.eval_every = 20
        c.train.checkpoint_every = 10
        c.evals.retrieval.max_examples = 64
        c.evals.linear_probe.steps = 30
    elif arg == "base":
        c.data.image_size = 224
        c.data.batch_size = 256
        c.model.embed_dim = 512
        c.model.image = tower_config("vit", "base")
        c.model.text = tower_config("bert", "base")
        c.model.text_init = ""
        c.train.num_steps = 20000
        c.train.eval_every = 2000
        c.train.checkpoint_every = 1000
    elif arg:
        raise ValueError(f"unknown preset {arg!r} for configs/clip.py; use '', 'tiny' or 'base'")
    c.model.image.image_size = c.data.get_ref("image_size")
    c.model.image.channels = c.data.get_ref("channels")
    return c
