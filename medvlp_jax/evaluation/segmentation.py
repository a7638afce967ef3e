"""The `segmentation` evaluator: Dice and IoU of a downstream segmenter on one split.

The predict function gives per-image pixel counts (`segment_counts`: TP / FP / FN at
probability 0.5, `[B, 3, C]`), so no mask leaves the devices; the metrics are
`dense_metrics.segmentation_metrics`: `dice`, `iou` (global over the split), `dice_per_image`
(empty truth and prediction score 1) and their per-class values.
"""

from __future__ import annotations

from medvlp_jax.evaluation.classification import check_split, class_columns
from medvlp_jax.evaluation.dense_metrics import segmentation_metrics

PRED = {"counts": "segment_counts"}
FIELDS = ("split", "classes")
check = check_split


def run(ctx, preds: dict, cfg) -> dict[str, float]:
    names, _ = class_columns(cfg.classes)
    counts = ctx.predict_records(ctx.records(cfg.split), {"counts": preds["counts"]})["counts"]
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    return segmentation_metrics({"tp": tp, "fp": fp, "fn": fn}, names)
