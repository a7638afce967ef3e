"""Dense-prediction metrics in numpy: segmentation Dice / IoU from per-image pixel counts, and
COCO-style detection AP / mAP (101-point interpolation, greedy matching by score).

Pure functions on arrays; not an evaluator (no `run`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# COCO's IoU thresholds 0.5:0.05:0.95 (rounded, so `f"{t:g}"` reads 0.55, not 0.5500000001).
COCO_IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2))


def _mean_defined(x: np.ndarray) -> float:
    """Mean of the non-NaN entries of `x`; NaN if there are none (no warning)."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def segmentation_counts(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image, per-class pixel counts.

    Args:
      pred, true: bool `[N, H, W, C]` masks (N images, C classes), numpy or jax arrays (the
        downstream segmenter counts on device with it).
    Returns:
      `{'tp', 'fp', 'fn'}`, each `[N, C]` (int64 for numpy, the default int for jax);
      concatenate batches' counts over N.
    """
    pred, true = pred.astype(bool), true.astype(bool)
    if pred.ndim != 4 or pred.shape != true.shape:
        raise ValueError(f"pred {pred.shape} and true {true.shape} must both be [N, H, W, C]")

    def count(mask):
        return mask.sum(axis=(1, 2))

    return {"tp": count(pred & true), "fp": count(pred & ~true), "fn": count(~pred & true)}


def segmentation_metrics(
    counts: dict[str, np.ndarray], class_names: Sequence[str]
) -> dict[str, float]:
    """Dice and IoU from `segmentation_counts` of a whole split.

    Args:
      counts: `{'tp', 'fp', 'fn'}` int `[N, C]`.
      class_names: C names, used in the keys.
    Returns:
      `dice/<class>`, `iou/<class>`: global over the split (counts summed over images), NaN for
      a class with no predicted and no true pixel anywhere; `dice_per_image/<class>`: the mean
      over images of each image's Dice, an image with neither predicted nor true pixels
      scoring 1 (SIIM-ACR convention); `dice`, `iou`, `dice_per_image`: means over classes,
      NaN classes left out (NaN if all are).
    """
    tp, fp, fn = (np.asarray(counts[k], np.float64) for k in ("tp", "fp", "fn"))
    if tp.ndim != 2 or tp.shape[1] != len(class_names):
        raise ValueError(f"counts {tp.shape} must be [N, C={len(class_names)}]")
    g_tp, g_fp, g_fn = tp.sum(0), fp.sum(0), fn.sum(0)
    defined = g_tp + g_fp + g_fn > 0
    safe = np.where(defined, g_tp + g_fp + g_fn, 1.0)
    per_class = {
        "dice": np.where(defined, 2 * g_tp / (safe + g_tp), np.nan),
        "iou": np.where(defined, g_tp / safe, np.nan),
    }
    image_union = tp + fp + fn
    image_dice = np.where(image_union > 0, 2 * tp / np.maximum(image_union + tp, 1.0), 1.0)
    per_class["dice_per_image"] = image_dice.mean(axis=0)
    out = {}
    for name, values in per_class.items():
        out |= {f"{name}/{c}": float(v) for c, v in zip(class_names, values)}
        out[name] = _mean_defined(values)
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes `a` `[N, 4]` and `b` `[M, 4]`, as (x0, y0, x1, y1) in continuous
    pixel coordinates (area = (x1 - x0) * (y1 - y0)) -> `[N, M]`; degenerate boxes give 0."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)

    def area(x: np.ndarray) -> np.ndarray:
        return np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)

    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def average_precision(scores: np.ndarray, is_tp: np.ndarray, num_gt: int) -> float:
    """COCO 101-point interpolated AP of one class at one IoU threshold.

    Args:
      scores: `[K]` detection scores, in any order (sorted here, descending, stable).
      is_tp: `[K]` bool: the detection matched a ground-truth box.
      num_gt: ground-truth boxes of the class.
    Returns:
      The mean, over recall points `linspace(0, 1, 101)`, of the precision envelope (max
      precision at any recall >= the point), 0 where the recall is never reached; NaN if
      `num_gt == 0`.
    """
    if num_gt == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = np.asarray(is_tp, bool)[order]
    tp = np.cumsum(hits)
    recall = tp / num_gt
    envelope = np.maximum.accumulate((tp / np.arange(1, len(hits) + 1))[::-1])[::-1]
    at = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.mean(np.append(envelope, 0.0)[at]))  # index len(hits): recall not reached


def _match(
    boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, thresholds: Sequence[float]
) -> np.ndarray:
    """Greedy COCO matching in one image and class: `[K, 4]` detections by descending score
    (stable) each take the unmatched ground-truth box (of `[M, 4]`) of highest IoU if that IoU
    is >= the threshold -> `is_tp` bool `[T, K]`, in the order of `boxes`."""
    order = np.argsort(-scores, kind="stable")
    iou = box_iou(boxes, gt_boxes)
    is_tp = np.zeros((len(thresholds), len(boxes)), bool)
    for t, threshold in enumerate(thresholds):
        free = np.ones(len(gt_boxes), bool)
        for d in order:
            candidates = np.where(free, iou[d], -1.0)
            if candidates.size and candidates.max() >= threshold:
                free[np.argmax(candidates)] = False
                is_tp[t, d] = True
    return is_tp


def detection_map(
    predictions: Sequence[dict],
    ground_truths: Sequence[dict],
    num_classes: int,
    iou_thresholds: Sequence[float] = (0.5,),
) -> dict[str, float]:
    """COCO-style AP per class and threshold, and mAP.

    Args:
      predictions: per image `{'boxes' [K, 4], 'scores' [K], 'classes' [K] int}` (K may be 0).
      ground_truths: per image (same order) `{'boxes' [M, 4], 'classes' [M] int}` (M may be 0).
      num_classes: classes are `0..num_classes-1`.
      iou_thresholds: match thresholds (e.g. `COCO_IOU_THRESHOLDS`).
    Returns:
      `ap@<t>/<c>` for each threshold t (written `f"{t:g}"`) and class c (NaN without ground
      truth); `map@<t>`: the mean over classes with ground truth (NaN if none); and with more
      than one threshold `map`, the mean of the `map@<t>`.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions vs {len(ground_truths)} ground truths")
    out = {}
    for c in range(num_classes):
        scores, is_tp, num_gt = [], [], 0
        for pred, gt in zip(predictions, ground_truths):
            mine = np.asarray(pred["classes"]) == c
            gt_boxes = np.asarray(gt["boxes"], np.float64).reshape(-1, 4)
            gt_boxes = gt_boxes[np.asarray(gt["classes"]) == c]
            det_scores = np.asarray(pred["scores"], np.float64)[mine]
            det_boxes = np.asarray(pred["boxes"], np.float64).reshape(-1, 4)[mine]
            scores.append(det_scores)
            is_tp.append(_match(det_boxes, det_scores, gt_boxes, iou_thresholds))
            num_gt += len(gt_boxes)
        scores_c, is_tp_c = np.concatenate(scores), np.concatenate(is_tp, axis=1)
        for t, threshold in enumerate(iou_thresholds):
            out[f"ap@{threshold:g}/{c}"] = average_precision(scores_c, is_tp_c[t], num_gt)
    maps = {}
    for threshold in iou_thresholds:
        aps = [out[f"ap@{threshold:g}/{c}"] for c in range(num_classes)]
        maps[f"map@{threshold:g}"] = _mean_defined(np.array(aps))
    out |= maps
    if len(iou_thresholds) > 1:
        out["map"] = _mean_defined(np.array(list(maps.values())))
    return out
