"""The `classification` evaluator: a downstream classifier's logits on one split.

Multi-label (`label_mode='multilabel'`): AUROC per class (`auroc/<class>`) and their mean
(`auroc`) over the rows whose label is known (after `data.uncertain_policy`); with a single
class (a binary task) also accuracy and F1 at probability 0.5. Multi-class: accuracy and
macro F1 over the rows with exactly one known positive among the classes (`rows`: how many).
"""

from __future__ import annotations

import numpy as np

from medvlp_jax.data.records import CHEXPERT_CLASSES
from medvlp_jax.evaluation.metrics import accuracy, macro_f1, multilabel_auroc

PRED = {"logits": "logits"}
FIELDS = ("split", "classes", "label_mode")
SPLITS = ("train", "validate", "test")
LABEL_MODES = ("multilabel", "multiclass")


def check_split(cfg) -> None:
    """The `check` of the downstream evaluators: `cfg.split` is a split."""
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r}; expected one of {SPLITS}")


def check(cfg) -> None:
    check_split(cfg)
    if cfg.label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode={cfg.label_mode!r}; expected one of {LABEL_MODES}")


def class_columns(classes) -> tuple[list[str], list[int]]:
    """(names, CheXpert column indices) of `classes` (() = all 14)."""
    names = list(classes) or list(CHEXPERT_CLASSES)
    return names, [CHEXPERT_CLASSES.index(c) for c in names]


def multiclass_rows(labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """labels / mask `[N, C]` -> (class `[N]`, valid `[N]`): valid rows have exactly one known
    positive and every class known. numpy or jax arrays alike (the loss uses it too)."""
    positive = (labels == 1) & (mask > 0)
    valid = (positive.sum(axis=1) == 1) & (mask > 0).all(axis=1)
    return positive.argmax(axis=1), valid


def metrics(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray, names, mode: str) -> dict:
    """The metrics of the module docstring from `[N, C]` logits, labels and label mask."""
    if mode == "multiclass":
        target, valid = multiclass_rows(labels, mask)
        pred = logits.argmax(axis=1)
        return {
            "accuracy": accuracy(pred[valid], target[valid]),
            "f1": macro_f1(pred[valid], target[valid], len(names)),
            "rows": float(valid.sum()),
        }
    result = multilabel_auroc(logits, labels, mask, names)
    out = {"auroc": result["macro"], **{f"auroc/{k}": v for k, v in result["per_class"].items()}}
    if len(names) == 1:
        known = mask[:, 0] > 0
        pred, true = (logits[known, 0] > 0).astype(int), labels[known, 0].astype(int)
        out["accuracy"] = accuracy(pred, true)
        out["f1"] = float(_binary_f1(pred, true))
    return out


def _binary_f1(pred: np.ndarray, true: np.ndarray) -> float:
    tp = np.sum((pred == 1) & (true == 1))
    denom = np.sum(pred == 1) + np.sum(true == 1)
    return 2 * tp / denom if denom else float("nan")


def run(ctx, preds: dict, cfg) -> dict[str, float]:
    names, cols = class_columns(cfg.classes)
    out = ctx.predict_records(ctx.records(cfg.split), {"logits": preds["logits"]})
    labels, mask = out["labels"][:, cols], out["label_mask"][:, cols]
    return metrics(out["logits"], labels, mask, names, cfg.label_mode)
