"""CLIP / ConVIRT baseline on SynthCXR: image tower, MiniLM text tower, InfoNCE.

Presets (`--config=configs/clip.py:PRESET`):
  ''    the default, ConVIRT's design at CPU size: ResNet-50 from scratch at 64 px, the
        pre-trained MiniLM text tower with its embeddings and first 4 of 6 layers frozen (as
        ConVIRT froze the lower half of its BERT), impression sections first; `bench quality`
        runs it (~15 minutes on 2 quiet cores).
  vit   the default with a hybrid ViT (the image tower MCPL's prompts need; MCPL's default
        backbone): a ResNet-50 trunk through layer3 (batch norms) makes the 4 x 4 tokens of a
        64 px image, then 4 transformer layers of width 256. A plain patch-16 ViT (or a
        conv-stem one) does not fit the CPU budget: on SynthCXR it needs far more steps to pick
        up the findings (measured, supervised, cardiomegaly AUROC: patch ViT 0.60 after 120
        steps, conv-stem ViT 0.62 after 80, this hybrid 0.87 after 40, ResNet-50 0.95 at 120).
  tiny  tests and CI: tiny towers, 32 px, 200 studies, 20 steps (< 1 minute).
  base  ViT-B/16 at 224 px + BERT-base-sized text, for accelerators with real data.
"""

from medvlp_jax.config import base_config
from medvlp_jax.models.builders import tower_config
from medvlp_jax.weights import load_spec


def get_config(arg: str = ""):
    c = base_config()
    c.method = "clip"
    c.model.loss = "clip"
    c.model.learn_temperature = True
    c.model.temperature = 0.07
    c.model.memory_light = False
    c.model.text_pooling = "mean"
    c.model.embed_dim = 256
    # Pre-trained towers (medvlp_jax/weights.py): --config.init.image.source=resnet50.safetensors
    c.init.image = load_spec("", into="image")
    c.init.text = load_spec("minilm", into="text")

    # Impressions name the positive findings in a sentence or two; findings sections list
    # many negatives that a mean-pooled sentence embedding barely tells apart.
    c.data.sections = ("impression", "findings")
    c.data.image_size = 64
    c.data.max_text_len = 48
    c.data.batch_size = 32
    c.model.image = tower_config("resnet50")
    c.model.text = tower_config("bert", "minilm")
    c.model.text.dropout_rate = 0.0
    c.model.text.attention_dropout_rate = 0.0

    c.optim.lr = 1e-3
    c.optim.groups = (
        r"text/(word_embeddings|position_embeddings|token_type_embeddings|embed_norm)/.* -> frozen",
        r"text/encoder/layer_[0-3]/.* -> frozen",
        "text/.* -> lr=0.1",  # gentler on the pre-trained text layers
    )
    c.optim.warmup_steps = 20
    c.train.num_steps = 200
    c.train.eval_every = 200
    c.train.checkpoint_every = 50

    if arg == "vit":
        c.model.image = tower_config("vit", "tiny")
        c.model.image.update(
            width=256, num_layers=4, num_heads=4, mlp_dim=1024, patch_size=16, stem="resnet"
        )
        c.model.image.proj_dim = 0  # the tiny preset's 16-wide projection would bottleneck
        c.optim.lr = 5e-4
        # The trunk's running statistics lag its weights at this lr (see configs/mflag.py).
        c.train.refresh_batch_stats = 30
    elif arg == "tiny":
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
        c.init.text.source = ""
        c.optim.groups = ("text/.* -> lr=0.1",)  # no frozen layers
        c.optim.lr = 1e-4
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
        c.init.text.source = ""
        c.optim.groups = ("text/.* -> lr=0.1",)  # no frozen layers
        c.optim.lr = 1e-4
        c.train.num_steps = 20000
        c.train.eval_every = 2000
        c.train.checkpoint_every = 1000
    elif arg:
        raise ValueError(
            f"unknown preset {arg!r} for configs/clip.py; use '', 'vit', 'tiny' or 'base'"
        )
    if c.model.image.name == "vit":
        c.model.image.image_size = c.data.get_ref("image_size")
    c.model.image.channels = c.data.get_ref("channels")
    return c
