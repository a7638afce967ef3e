"""The downstream task configs (`configs/{classification,segmentation,detection}.py` call
`task_config`), and the fields `python -m medvlp_jax.downstream` fills from the pre-training
run."""

from __future__ import annotations

import ml_collections

from medvlp_jax.config import base_config
from medvlp_jax.data.records import FIVE_CLASSES

# The validate metric each task selects its checkpoint by (`eval/<source>/<metric>`).
SELECTION_METRIC = {"classification": "auroc", "segmentation": "dice", "detection": "map@0.5"}
# The pre-training run's data fields the encoder's inputs depend on: copied into the task's
# data config (the images and texts must look as they did in pre-training).
ENCODER_INPUT_FIELDS = (
    "image_size",
    "channels",
    "mean",
    "std",
    "tokenizer",
    "max_text_len",
    "sections",
    "section_mode",
    "section_separator",
)
# Where the data lives: by default the task reads the pre-training run's dataset.
DATA_LOCATION_FIELDS = ("source", "root", "reports_root", "cache_dir", "synthcxr", "frontal_only")


def _eval(task: str, split: str, classes, label_mode: str) -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict({"type": task, "enabled": True, "split": split})
    e.classes = classes
    if task == "classification":
        e.label_mode = label_mode
    return e


def task_config(task: str, preset: str = "") -> ml_collections.ConfigDict:
    """The run config of downstream `task` ('' or 'tiny' preset); `downstream.encoder` and
    `init.encoder` are left for the runner (they come from `--pretrained`)."""
    if preset not in ("", "tiny"):
        raise ValueError(f"downstream {task} config: unknown preset {preset!r} ('' or 'tiny')")
    c = base_config()
    c.method = "downstream"
    d = c.downstream = ml_collections.ConfigDict()
    d.task = task
    d.encoder = ml_collections.ConfigDict()  # the pre-training run's config (from --pretrained)
    d.finetune = False  # False: frozen encoder (linear probe / frozen-encoder decoder)
    # CheXpert columns the head predicts (() = all 14; dense tasks: findings with regions).
    d.classes = () if task == "classification" else FIVE_CLASSES
    d.label_mode = "multilabel"  # classification: 'multilabel' (BCE) | 'multiclass' (softmax)
    d.feature = "embed_image"  # classification: the encoder's [B, D] predict function
    d.head_hidden = 0  # classification: 0 = linear; > 0: Linear -> BN -> ReLU -> Linear
    d.decoder_width = 64  # segmentation / detection: U-Net decoder width
    d.out_stride = 4  # dense heads' output stride (segmentation upsamples to full size)
    d.mask_suffix = "_mask.png"  # segmentation masks: <image stem><suffix> (see targets.py)
    d.boxes_csv = ""  # detection boxes csv ('' = SynthCXR's mimic-cxr-synth-boxes.csv)
    d.max_boxes = 16  # detection: boxes per image at most
    d.top_k = 50  # detection: decoded boxes per image

    c.evals = ml_collections.ConfigDict()
    c.evals[task] = _eval(task, "validate", d.get_ref("classes"), d.get_ref("label_mode"))

    c.init = ml_collections.ConfigDict()  # the runner adds init.encoder
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 10
    c.data.augment.enabled = task == "classification"
    c.data.batch_size = 32
    c.train.num_steps = 300
    c.train.eval_every = 50
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 1
    c.train.keep_best_mode = "max"
    if preset == "tiny":
        c.data.batch_size = 8
        c.data.eval_batch_size = 16
        d.decoder_width = 8
        d.top_k = 10
        c.train.num_steps = 4
        c.train.eval_every = 2
        c.train.checkpoint_every = 2
        c.train.log_every = 2
    return c
