"""Zero-shot classification from image embeddings and prompt (class text) embeddings."""

from __future__ import annotations

import numpy as np

from medvlp_jax.evaluation.metrics import accuracy, l2_normalize, macro_f1


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
