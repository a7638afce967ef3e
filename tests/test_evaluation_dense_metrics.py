"""Segmentation Dice / IoU and COCO-style detection AP on hand-computed cases."""

import numpy as np
import pytest

from medvlp_jax.evaluation import dense_metrics
from medvlp_jax.evaluation.dense_metrics import (
    COCO_IOU_THRESHOLDS,
    average_precision,
    box_iou,
    detection_map,
    segmentation_counts,
    segmentation_metrics,
)


def _masks():
    """2 images, 4x4, classes (lung, tube) -> pred, true `[2, 4, 4, 2]`."""
    pred = np.zeros((2, 4, 4, 2), bool)
    true = np.zeros((2, 4, 4, 2), bool)
    true[0, :2, :2, 0] = True  # image 0 lung: true 2x2 block (4 px)
    pred[0, :2, :3, 0] = True  # pred 2x3 block (6 px): tp 4, fp 2, fn 0
    true[0, 3, :, 1] = True  # image 0 tube: true bottom row (4 px)
    pred[0, 2:, 3, 1] = True  # pred (2,3), (3,3)
    pred[0, 3, 2, 1] = True  # and (3,2): tp (3,2), (3,3) = 2, fp (2,3) = 1, fn (3,0), (3,1) = 2
    pred[1, 0, 0, 1] = True  # image 1: no lung at all; one tube pixel on an empty truth: fp 1
    return pred, true


def test_segmentation_counts_by_hand_and_accumulated():
    pred, true = _masks()
    counts = segmentation_counts(pred, true)
    np.testing.assert_array_equal(counts["tp"], [[4, 2], [0, 0]])
    np.testing.assert_array_equal(counts["fp"], [[2, 1], [0, 1]])
    np.testing.assert_array_equal(counts["fn"], [[0, 2], [0, 0]])
    assert counts["tp"].dtype == np.int64
    batches = [segmentation_counts(pred[i : i + 1], true[i : i + 1]) for i in range(2)]
    for key, value in counts.items():
        np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]), value)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        segmentation_counts(pred[0], true[0])


def test_segmentation_metrics_by_hand():
    res = segmentation_metrics(segmentation_counts(*_masks()), ["lung", "tube"])
    # Global: lung tp 4, fp 2, fn 0 -> Dice 8/10, IoU 4/6; tube tp 2, fp 1 + 1, fn 2 -> Dice
    # 4/8, IoU 2/6.
    assert res["dice/lung"] == pytest.approx(0.8) and res["iou/lung"] == pytest.approx(2 / 3)
    assert res["dice/tube"] == pytest.approx(0.5) and res["iou/tube"] == pytest.approx(1 / 3)
    assert res["dice"] == pytest.approx(0.65) and res["iou"] == pytest.approx(0.5)
    # Per image: lung 0.8 and 1 (both empty); tube 4/7 and 0 (a pixel on an empty truth).
    assert res["dice_per_image/lung"] == pytest.approx(0.9)
    assert res["dice_per_image/tube"] == pytest.approx(2 / 7)
    assert res["dice_per_image"] == pytest.approx((0.9 + 2 / 7) / 2)
    assert len(res) == 9


def test_segmentation_empty_class_is_nan_globally_and_one_per_image():
    pred = np.zeros((3, 4, 4, 2), bool)
    true = np.zeros((3, 4, 4, 2), bool)
    pred[0, 1, 1, 1] = true[0, 1, 1, 1] = True  # class 1: one perfect pixel in image 0
    res = segmentation_metrics(segmentation_counts(pred, true), ["empty", "dot"])
    assert np.isnan(res["dice/empty"]) and np.isnan(res["iou/empty"])
    assert res["dice_per_image/empty"] == 1.0
    assert res["dice/dot"] == 1.0 and res["dice_per_image/dot"] == 1.0  # images 1, 2 empty: 1
    assert res["dice"] == 1.0 and res["iou"] == 1.0  # the NaN class left out of the mean
    only_empty = segmentation_metrics(segmentation_counts(pred[..., :1], true[..., :1]), ["e"])
    assert np.isnan(only_empty["dice"]) and np.isnan(only_empty["iou"])
    assert only_empty["dice_per_image"] == 1.0
    with pytest.raises(ValueError, match="C=3"):
        segmentation_metrics(segmentation_counts(pred, true), ["a", "b", "c"])


def test_box_iou_known_boxes():
    a = np.array([[0, 0, 2, 2], [1, 1, 1, 3]])  # a 2x2 box; a degenerate one (x0 == x1)
    b = np.array([[0, 0, 2, 2], [3, 3, 4, 4], [1, 0, 3, 2], [1, 1, 1, 3]])
    # identical 1; disjoint 0; half overlap: intersection 2, union 4 + 4 - 2 -> 1/3
    np.testing.assert_allclose(box_iou(a, b), [[1, 0, 1 / 3, 0], [0, 0, 0, 0]], atol=1e-15)
    assert box_iou(a, np.zeros((0, 4))).shape == (2, 0)
    assert box_iou(np.array([[0.0, 0, 1, 1]]), np.array([[0.5, 0, 1.5, 1]]))[0, 0] == 1 / 3


def test_average_precision_by_hand():
    assert average_precision(np.array([0.9, 0.8]), np.array([True, True]), 2) == 1.0
    assert average_precision(np.zeros(0), np.zeros(0, bool), 3) == 0.0
    assert np.isnan(average_precision(np.array([0.5]), np.array([False]), 0))
    # FP (0.9) above two TPs (0.8, 0.7), 3 ground-truth boxes (one never found):
    # precision 0, 1/2, 2/3 at recall 0, 1/3, 2/3 -> envelope 2/3 for recall points 0.00 ...
    # 0.66 (67 of 101), 0 for 0.67 ... 1.00 (recall never reached) -> AP = 67 * (2/3) / 101.
    scores, is_tp = np.array([0.7, 0.9, 0.8]), np.array([True, False, True])  # unsorted
    assert average_precision(scores, is_tp, 3) == pytest.approx(67 * (2 / 3) / 101)
    # Equal scores keep their order (stable): TP first here, FP first when swapped.
    tied = np.array([0.5, 0.5])
    assert average_precision(tied, np.array([True, False]), 1) == 1.0
    assert average_precision(tied, np.array([False, True]), 1) == pytest.approx(0.5)


def _image(boxes, classes, scores=None):
    out = {"boxes": np.array(boxes, float).reshape(-1, 4), "classes": np.array(classes, int)}
    return out if scores is None else {**out, "scores": np.array(scores, float)}


A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]


def test_detection_map_duplicates_class_mismatch_and_empty_images():
    ground_truths = [
        _image([A, B], [0, 1]),
        _image([], []),  # an image with no boxes at all, and no detections
        _image([], []),
        _image([C], [0]),
    ]
    predictions = [
        # A twice (the lower-scored copy is a duplicate: FP), and B detected as class 0
        _image([A, A, B], [0, 0, 0], [0.95, 0.9, 0.5]),
        _image([], [], []),
        _image([C], [2], [0.3]),  # class 2 has no ground truth: NaN, left out of the mAP
        _image([C], [0], [0.6]),
    ]
    res = detection_map(predictions, ground_truths, num_classes=3)
    # Class 0 (2 boxes), by score: 0.95 TP, 0.9 FP (duplicate), 0.6 TP, 0.5 FP (B is not A):
    # precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1 -> envelope 1 up to recall 0.5
    # (51 points), 2/3 above (50 points) -> AP = (51 + 50 * 2/3) / 101.
    ap0 = (51 + 50 * 2 / 3) / 101
    assert res["ap@0.5/0"] == pytest.approx(ap0)
    assert res["ap@0.5/1"] == 0.0  # B's only detection has the wrong class
    assert np.isnan(res["ap@0.5/2"])
    assert res["map@0.5"] == pytest.approx(ap0 / 2)
    assert set(res) == {"ap@0.5/0", "ap@0.5/1", "ap@0.5/2", "map@0.5"}  # one threshold: no map
    nothing = detection_map([_image([], [], [])], [_image([], [])], num_classes=2)
    assert all(np.isnan(v) for v in nothing.values()) and len(nothing) == 3
    with pytest.raises(ValueError, match="1 predictions vs 2"):
        detection_map(predictions[:1], ground_truths[:2], 3)


def test_detection_map_over_coco_thresholds():
    assert len(COCO_IOU_THRESHOLDS) == 10 and f"{COCO_IOU_THRESHOLDS[1]:g}" == "0.55"
    gts = [_image([A], [0]), _image([B], [1])]
    perfect = detection_map(
        [_image([A], [0], [0.9]), _image([B], [1], [0.8])], gts, 2, COCO_IOU_THRESHOLDS
    )
    assert perfect["map"] == 1.0 and perfect["map@0.95"] == 1.0
    # A shifted by 1.5 px: IoU = 8.5 * 10 / (200 - 85) = 0.739 -> a match at 0.5 ... 0.7 (5 of
    # the 10 thresholds), none from 0.75 -> map = 5/10.
    shifted = [1.5, 0, 11.5, 10]
    assert box_iou(np.array([shifted]), np.array([A]))[0, 0] == pytest.approx(8.5 / 11.5)
    res = detection_map([_image([shifted], [0], [0.9])], gts[:1], 1, COCO_IOU_THRESHOLDS)
    assert res["ap@0.7/0"] == 1.0 and res["ap@0.75/0"] == 0.0
    assert res["map@0.7"] == 1.0 and res["map@0.75"] == 0.0
    assert res["map"] == pytest.approx(5 / 10)
    assert len(res) == 10 + 10 + 1


def test_dense_metrics_is_not_an_evaluator():
    assert not any(hasattr(dense_metrics, name) for name in ("run", "PRED", "FIELDS"))
