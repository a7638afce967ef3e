"""The `detection` evaluator: COCO-style mAP of a downstream detector on one split.

`detections` `[B, K, 6]` (x0, y0, x1, y1, score, class) and `box_targets` `[B, M, 6]` (x0,
y0, x1, y1, valid, class) per image -> `map@0.5`, `map@0.75`, `map` (mean over IoU 0.5:0.95)
and `ap@0.5/<class>`, from `dense_metrics.detection_map` (classes without a true box in the
split are left out of the means).
"""

from __future__ import annotations

import numpy as np

from medvlp_jax.evaluation.classification import check_split, class_columns
from medvlp_jax.evaluation.dense_metrics import COCO_IOU_THRESHOLDS, detection_map

PRED = {"detections": "detections", "targets": "box_targets"}
FIELDS = ("split", "classes")
check = check_split


def split_rows(detections: np.ndarray, targets: np.ndarray) -> tuple[list[dict], list[dict]]:
    """Per-image arrays -> `detection_map`'s lists of prediction and ground-truth dicts."""
    preds = [
        {"boxes": d[:, :4], "scores": d[:, 4], "classes": d[:, 5].astype(int)} for d in detections
    ]
    truths = []
    for t in targets:
        valid = t[:, 4] > 0
        truths.append({"boxes": t[valid, :4], "classes": t[valid, 5].astype(int)})
    return preds, truths


def run(ctx, preds: dict, cfg) -> dict[str, float]:
    names, _ = class_columns(cfg.classes)
    out = ctx.predict_records(ctx.records(cfg.split), preds)
    predictions, truths = split_rows(out["detections"], out["targets"])
    coco = detection_map(predictions, truths, len(names), COCO_IOU_THRESHOLDS)
    per_class = {f"ap@0.5/{name}": coco[f"ap@0.5/{c}"] for c, name in enumerate(names)}
    return {
        "map@0.5": coco["map@0.5"],
        "map@0.75": coco["map@0.75"],
        "map": coco["map"],
        **per_class,
    }
