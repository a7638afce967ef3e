"""The downstream method: a pre-trained method's image encoder plus a task head, trained by
the same trainer as pre-training (`config.method='downstream'`).

The encoder is any registered method, built from `config.downstream.encoder` (the
pre-training run's config; its last stage) and read only through its predict functions, so
prompted encoders (MCPL's, PTUnifier's) take part as they are:

- `classification`: `downstream.feature` (default `embed_image`, `[B, D]`) -> a linear layer
  (`head_hidden=0`) or Linear -> BN -> ReLU -> Linear (`head_hidden` wide; MCPL's published
  head) over `downstream.classes`: masked multi-label BCE (`label_mode='multilabel'`, with
  `data.uncertain_policy`) or softmax cross-entropy over the records with exactly one
  positive among the classes (`'multiclass'`; other records are masked out).
- `segmentation`: `feature_pyramid` -> `SegmentationHead` (U-Net decoder), BCE + soft Dice
  against the masks of `downstream.classes`.
- `detection`: `feature_pyramid` -> `CenterNetHead`, focal + L1 losses; decoded boxes for mAP.

Variables: `{'params': {'encoder': ..., 'head': ...}, <collection>: {'encoder': ...,
['head': ...]}}`. `downstream.finetune=False` freezes every encoder parameter (linear probe,
frozen-encoder decoder); True trains the encoder too, except what its own method freezes (its
frozen group rows: M-FLAG's language model, MCPL's CLIP backbone). The encoder always runs in
inference mode (running batch-norm statistics, no dropout), as dense fine-tuning commonly
freezes batch norm.

Predict functions: `logits` `[B, C]`; `segment_counts` `[B, 3, C]` (per image TP / FP / FN
pixels at probability 0.5 against `batch['masks']`); `detections` `[B, K, 6]` (x0, y0, x1,
y1, score, class; input pixels) and `box_targets` `[B, M, 6]` (x0, y0, x1, y1, valid, class).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medvlp_jax import stages
from medvlp_jax.config import ConfigError
from medvlp_jax.data import sources
from medvlp_jax.data.records import CHEXPERT_CLASSES
from medvlp_jax.data.synthcxr import BOXES_CSV
from medvlp_jax.downstream.targets import BoxTargets, MaskTargets, read_boxes
from medvlp_jax.evaluation.classification import LABEL_MODES, class_columns, multiclass_rows
from medvlp_jax.evaluation.dense_metrics import segmentation_counts
from medvlp_jax.losses.common import f32
from medvlp_jax.losses.dense import centernet_loss, segmentation_loss
from medvlp_jax.methods.base import Method, SetupContext, get_method
from medvlp_jax.models import dense_heads
from medvlp_jax.models.heads import MLPHead
from medvlp_jax.optim import parse_rule

TASKS = ("classification", "segmentation", "detection")
ENCODER, HEAD = "encoder", "head"


def encoder_config(pretrained: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config the encoder is built from: a run config's last stage."""
    return stages.resolve(pretrained)[-1].config


def _part(variables: dict, part: str) -> dict:
    """`{collection: tree}` of one part ('encoder' / 'head') of the downstream variables."""
    return {k: v[part] for k, v in variables.items() if part in v}


class Downstream(Method):
    """A pre-trained encoder (any method) and a classification, segmentation or detection head."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        d = config.downstream
        if d.task not in TASKS:
            raise ConfigError(f"config.downstream.task={d.task!r}; expected one of {TASKS}")
        if d.label_mode not in LABEL_MODES:
            raise ConfigError(
                f"config.downstream.label_mode={d.label_mode!r}; expected {LABEL_MODES}"
            )
        if d.task != "classification" and config.data.augment.enabled:
            raise ConfigError(
                f"downstream.task={d.task!r} needs data.augment.enabled=False: the masks and "
                "boxes follow the evaluation geometry, not a random crop"
            )
        if not d.encoder:
            raise ConfigError("config.downstream.encoder is empty: give --pretrained=WORKDIR")
        unknown = [c for c in d.classes if c not in CHEXPERT_CLASSES]
        if unknown:
            raise ConfigError(f"downstream.classes: {unknown} are not CheXpert classes")
        self.class_names, self.columns = class_columns(d.classes)
        self.encoder = get_method(encoder_config(d.encoder))
        self.head = self._build_head()

    def _build_head(self):
        d, n = self.config.downstream, len(self.columns)
        if d.task == "classification":
            widths = (d.head_hidden, n) if d.head_hidden else (n,)
            return MLPHead(widths)
        cls = (
            dense_heads.SegmentationHead if d.task == "segmentation" else dense_heads.CenterNetHead
        )
        return cls(n, d.decoder_width, d.out_stride)

    # --- setup, data, init --------------------------------------------------------------

    def setup(self, ctx: SetupContext) -> None:
        # The encoder's method prepares without training records: nothing of its training
        # objective (M-FLAG's frozen-LM cache) is needed to read its image features.
        inner = dataclasses.replace(ctx, config=self.encoder.config, train_records=[])
        self.encoder.setup(inner)

    def data_hooks(self, tokenizer) -> tuple:
        d, data = self.config.downstream, self.config.data
        names = self.class_names
        own: tuple = ()
        if d.task == "segmentation":
            own = (MaskTargets(names, data.image_size, d.mask_suffix),)
        elif d.task == "detection":
            path = d.boxes_csv or str(sources.synthcxr_root(data) / BOXES_CSV)
            boxes = read_boxes(path, names)
            own = (BoxTargets(boxes, len(names), data.image_size, d.out_stride, d.max_boxes),)
        return (*self.encoder.data_hooks(tokenizer), *own)

    def init(self, rng, batch):
        enc_rng, head_rng = jax.random.split(rng)
        encoder = self.encoder.init(enc_rng, batch)
        features = jax.eval_shape(lambda: self._features(encoder, batch))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), features)
        head = self.head.init(head_rng, *self._head_args(zeros))
        out = {k: {ENCODER: v} for k, v in encoder.items()}
        for k, v in head.items():
            out.setdefault(k, {})[HEAD] = v
        return out

    def group_rules(self) -> tuple[str, ...]:
        if not self.config.downstream.finetune:
            return (f"{ENCODER}/.* -> frozen",)
        rows = [parse_rule(t, "encoder row", False) for t in self.encoder.group_rules()]
        return tuple(f"{ENCODER}/(?:{r.pattern.pattern}) -> frozen" for r in rows if r.group.frozen)

    # --- forward ------------------------------------------------------------------------

    def _features(self, encoder_variables: dict, batch):
        d = self.config.downstream
        fns = self.encoder.predict_fns()
        name = d.feature if d.task == "classification" else "feature_pyramid"
        if name not in fns:
            raise ConfigError(
                f"downstream: the {self.encoder.config.method!r} encoder has no predict function "
                f"{name!r} (has {sorted(fns)}; set downstream.feature)"
            )
        return fns[name](encoder_variables, batch)

    def _head_args(self, features) -> tuple:
        if self.config.downstream.task == "classification":
            return (features,)
        return (features, self.config.data.image_size)

    def _forward(self, variables, batch, train: bool):
        """(head outputs, updated head collections)."""
        features = self._features(_part(variables, ENCODER), batch)
        if not self.config.downstream.finetune:
            features = jax.lax.stop_gradient(features)
        head_vars = _part(variables, HEAD)
        args = self._head_args(features)
        if self.config.downstream.task == "classification":
            if train and "batch_stats" in head_vars:
                out, updates = self.head.apply(
                    head_vars, *args, train=True, mutable=["batch_stats"]
                )
                return out, dict(updates)
            return self.head.apply(head_vars, *args, train=False), {}
        return self.head.apply(head_vars, *args), {}

    def loss(self, variables, batch, rng, train):
        out, head_updates = self._forward(variables, batch, train)
        task = self.config.downstream.task
        if task == "classification":
            loss, metrics = self._classification_loss(out, batch)
        elif task == "segmentation":
            loss, metrics = segmentation_loss(out, batch["masks"])
        else:
            loss, metrics = centernet_loss(out, batch)
        new_state = {k: {**variables[k], HEAD: v} for k, v in head_updates.items()}
        return loss, metrics, new_state

    def _labels(self, batch):
        cols = jnp.asarray(self.columns)
        return f32(batch["labels"])[:, cols], f32(batch["label_mask"])[:, cols]

    def _classification_loss(self, logits, batch):
        labels, mask = self._labels(batch)
        if self.config.downstream.label_mode == "multilabel":
            per = optax.sigmoid_binary_cross_entropy(f32(logits), labels) * mask
            return jnp.sum(per) / jnp.maximum(jnp.sum(mask), 1.0), {}
        target, valid = multiclass_rows(labels, mask)
        per = optax.softmax_cross_entropy_with_integer_labels(f32(logits), target)
        loss = jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1)
        return loss, {"multiclass_rows": jnp.mean(valid.astype(jnp.float32))}

    # --- predictions --------------------------------------------------------------------

    def logits(self, variables, batch):
        return self._forward(variables, batch, train=False)[0]

    def segment_counts(self, variables, batch):
        pred = self._forward(variables, batch, train=False)[0] > 0.0  # sigmoid(x) > 0.5
        counts = segmentation_counts(pred, batch["masks"] > 0)
        return jnp.stack([counts["tp"], counts["fp"], counts["fn"]], axis=1)

    def detections(self, variables, batch):
        d = self.config.downstream
        out = self._forward(variables, batch, train=False)[0]
        dets = dense_heads.decode_centernet(out, d.top_k, d.out_stride)
        extras = [dets["scores"][..., None], dets["classes"][..., None].astype(jnp.float32)]
        return jnp.concatenate([dets["boxes"], *extras], axis=-1)

    def box_targets(self, variables, batch):
        del variables
        valid = batch["box_valid"].astype(jnp.float32)[..., None]
        classes = batch["box_classes"].astype(jnp.float32)[..., None]
        return jnp.concatenate([f32(batch["boxes"]), valid, classes], axis=-1)

    def predict_fns(self):
        task = self.config.downstream.task
        if task == "classification":
            return {"logits": self.logits}
        if task == "segmentation":
            return {"segment_counts": self.segment_counts}
        return {"detections": self.detections, "box_targets": self.box_targets}
