"""Classification metrics in numpy: tie-aware AUROC (binary and masked multi-label), accuracy,
macro-F1. Also the numpy row normalisation the evaluators share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """`[..., D]` rows divided by `max(||row||, eps)`, in float64."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic with average ranks.

    Equals P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg) over all
    (positive, negative) pairs, so ties count one half.

    Args:
      scores: `[N]` real scores (higher = more positive).
      labels: `[N]` 0/1 (or bool).
    Returns:
      AUROC in [0, 1].
    Raises:
      ValueError: if `labels` are not all 0/1 or only one class is present (AUROC undefined).
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("AUROC labels must be 0/1")
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positives, {n_neg} negatives")
    ranks = rankdata(scores)  # average ranks for ties, 1-based
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def multilabel_auroc(
    scores: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Macro AUROC over the columns of a multi-label problem, each column on its own valid rows.

    Args:
      scores: `[N, C]`.
      labels: `[N, C]` 0/1 (values where `mask` is 0 are ignored, NaN allowed there).
      mask: `[N, C]` 1 where the label is known, or None for all known.
      class_names: C names for the report (default '0', '1', ...).
    Returns:
      `{'macro': mean AUROC over the scorable columns (NaN if none),
        'per_class': {name: AUROC}, 'skipped': [names of columns with one class only]}`.
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be [N, C]")
    mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if mask.shape != labels.shape:
        raise ValueError(f"mask {mask.shape} must match labels {labels.shape}")
    names = [str(c) for c in range(labels.shape[1])] if class_names is None else list(class_names)
    if len(names) != labels.shape[1]:
        raise ValueError(f"{len(names)} class_names for {labels.shape[1]} columns")
    per_class, skipped = {}, []
    for c, name in enumerate(names):
        y = labels[mask[:, c], c]
        if len(np.unique(y)) < 2:
            skipped.append(name)
            continue
        per_class[name] = auroc(scores[mask[:, c], c], y)
    macro = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"macro": macro, "per_class": per_class, "skipped": skipped}


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `[N]` predictions equal to the `[N]` labels."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.size == 0:
        raise ValueError(f"predictions {predictions.shape} vs labels {labels.shape}")
    return float(np.mean(predictions == labels))


def macro_f1(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 = 2 TP / (2 TP + FP + FN).

    Classes that appear neither in `labels` nor in `predictions` are left out of the mean
    (their F1 is undefined); a class that is present but never predicted counts as F1 = 0.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.size == 0:
        raise ValueError(f"predictions {predictions.shape} vs labels {labels.shape}")
    classes = np.arange(num_classes)[:, None]
    pred_c, true_c = predictions[None] == classes, labels[None] == classes
    tp = np.sum(pred_c & true_c, axis=1)
    denom = pred_c.sum(axis=1) + true_c.sum(axis=1)  # = 2 TP + FP + FN
    present = denom > 0
    return float(np.mean(2 * tp[present] / denom[present]))
