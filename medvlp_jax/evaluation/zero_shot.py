"""Zero-shot classification from image embeddings and prompt (class text) embeddings, and
the `zero_shot` evaluator."""

from __future__ import annotations

import numpy as np

from medvlp_jax.data.sources import ZERO_SHOT_CLASSES
from medvlp_jax.evaluation.metrics import accuracy, l2_normalize, macro_f1

PRED = {"image": "embed_image", "text": "embed_text", "score": ""}
# score (optional): a predict function `[B, C]` scoring each image of the batch against the C
# classes, whose `text` features (averaged over the templates) it gets as the batch field
# `class_features` `[C, F]` (one array, not per row); the `image` role is then unused. For
# scores that are not a cosine of two embeddings (PRIOR's global + local score).
# classes: names from the data's zero-shot list (() = all of ZERO_SHOT_CLASSES, in its order);
# templates: prompt patterns, "{}" = the lower-cased class name; a class is the average of its
# prompts' embeddings.
FIELDS = ("classes", "templates")


def class_embeddings(class_text_emb: np.ndarray) -> np.ndarray:
    """One unit vector per class from its prompt-template embeddings.

    Args:
      class_text_emb: `[C, K, D]` (K templates per class) or `[C, D]` (one prompt each).
    Returns:
      `[C, D]` float64: each template embedding l2-normalised, averaged over K, re-normalised.
    """
    emb = np.asarray(class_text_emb)
    if emb.ndim == 2:
        emb = emb[:, None]
    if emb.ndim != 3:
        raise ValueError(f"class_text_emb must be [C, K, D] or [C, D], got {emb.shape}")
    return l2_normalize(l2_normalize(emb).mean(axis=1))


def zero_shot_classify(
    image_emb: np.ndarray, class_text_emb: np.ndarray, labels: np.ndarray | None = None
) -> dict:
    """Assigns each image the class whose (template-averaged) text embedding is most similar.

    Args:
      image_emb: `[N, D]` image embeddings (normalised here).
      class_text_emb: `[C, K, D]` or `[C, D]` class prompt embeddings (see `class_embeddings`).
      labels: `[N]` int true classes in [0, C), or None to only predict.
    Returns:
      `{'predictions': [N] int, 'scores': [N, C] cosine similarities}` plus, with labels,
      `'acc'` and `'macro_f1'` (fractions in [0, 1]).
    """
    image_emb = np.asarray(image_emb)
    classes = class_embeddings(class_text_emb)
    if image_emb.ndim != 2 or image_emb.shape[1] != classes.shape[1]:
        raise ValueError(f"image_emb {image_emb.shape} vs class embeddings {classes.shape}")
    scores = l2_normalize(image_emb) @ classes.T
    out = {"predictions": np.argmax(scores, axis=1), "scores": scores}
    if labels is not None:
        labels = np.asarray(labels)
        out["acc"] = accuracy(out["predictions"], labels)
        out["macro_f1"] = macro_f1(out["predictions"], labels, classes.shape[0])
    return out


def check(cfg) -> None:
    """Classes must be names of the data's zero-shot list; at least one template."""
    unknown = [c for c in cfg.classes if c not in ZERO_SHOT_CLASSES]
    if unknown:
        raise ValueError(f"classes {unknown} are not zero-shot classes {ZERO_SHOT_CLASSES}")
    if not cfg.templates:
        raise ValueError("templates is empty")


def run(ctx, preds: dict, cfg) -> dict[str, float]:
    """Accuracy and macro-F1 on the data's zero-shot list, restricted to `cfg.classes` (the
    images of other classes are left out)."""
    classes = tuple(cfg.classes) or ZERO_SHOT_CLASSES
    records, labels = ctx.zero_shot_records()
    remap = np.full(len(ZERO_SHOT_CLASSES), -1)
    remap[[ZERO_SHOT_CLASSES.index(c) for c in classes]] = np.arange(len(classes))
    labels = remap[labels]
    records = [r for r, label in zip(records, labels, strict=True) if label >= 0]
    prompts = [t.format(c.lower()) for c in classes for t in cfg.templates]
    class_emb = ctx.predict_texts(prompts, preds["text"])
    class_emb = class_emb.reshape(len(classes), len(cfg.templates), -1)
    labels = labels[labels >= 0]
    if "score" in preds:
        features = class_emb.mean(axis=1)
        score = lambda batch: preds["score"]({**batch, "class_features": features})
        predictions = np.argmax(ctx.predict_records(records, {"score": score})["score"], axis=1)
        return {
            "zero_shot_acc": accuracy(predictions, labels),
            "zero_shot_macro_f1": macro_f1(predictions, labels, len(classes)),
        }
    images = ctx.predict_records(records, {"image": preds["image"]})["image"]
    result = zero_shot_classify(images, class_emb, labels)
    return {"zero_shot_acc": result["acc"], "zero_shot_macro_f1": result["macro_f1"]}
