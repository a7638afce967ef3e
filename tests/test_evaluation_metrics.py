"""AUROC (against hand cases and an independent pairwise count), accuracy, macro-F1."""

import numpy as np
import pytest

from medvlp_jax.evaluation.metrics import accuracy, auroc, macro_f1, multilabel_auroc


def _pairwise_auroc(scores, labels):
    """O(P*N) reference: P(pos > neg) + 0.5 P(pos == neg) over all pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size


def test_auroc_hand_cases():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 2, 2, 3], [0, 0, 1, 1]) == 0.875  # one tied pair counts 1/2
    assert auroc([0.5, 0.5, 0.5], [1, 0, 1]) == 0.5
    assert auroc([3, 2, 1], [1, 0, 0]) == 1.0
    assert auroc([3, 2, 1], [0, 1, 1]) == 0.0


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        scores = rng.integers(0, 6, size=n).astype(float)  # many ties
        labels = rng.integers(0, 2, size=n)
        labels[:2] = (0, 1)
        assert auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_rejects_single_class_and_bad_labels():
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2], [0, 2])


def test_multilabel_auroc_masks_and_skips():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.2], [0.7, 0.6, 0.1], [0.1, 0.3, 0.9]])
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, np.nan, 1]])
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 0, 1]])
    res = multilabel_auroc(scores, labels, mask, class_names=["a", "b", "c"])
    # a: perfect. b: rows 0, 1 only -> neg 0.1 < pos 0.8 -> 1.0 (the masked 0.6 would not
    # matter here, so also check a masked entry that would change the answer below).
    # c: one class only -> skipped.
    assert res["per_class"] == {"a": 1.0, "b": 1.0}
    assert res["skipped"] == ["c"] and res["macro"] == 1.0
    mask2 = np.ones_like(mask)
    labels2 = np.nan_to_num(labels)  # row 3 of column b becomes a negative scored 0.3
    labels2[2, 1] = 0  # and row 2 a negative scored 0.6
    res2 = multilabel_auroc(scores, labels2, mask2)
    assert res2["per_class"]["1"] == pytest.approx(1.0)
    labels2[1, 1] = 0
    labels2[3, 1] = 1  # positive 0.3 vs negatives 0.1, 0.8, 0.6
    assert multilabel_auroc(scores, labels2, mask2)["per_class"]["1"] == pytest.approx(1 / 3)
    empty = multilabel_auroc(scores[:, 2:], labels[:, 2:])
    assert np.isnan(empty["macro"]) and empty["skipped"] == ["0"]


def test_accuracy_and_macro_f1():
    pred = np.array([0, 0, 1, 2, 2, 2])
    true = np.array([0, 1, 1, 2, 2, 0])
    assert accuracy(pred, true) == pytest.approx(4 / 6)
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2: tp 2, fp 1 -> 0.8
    assert macro_f1(pred, true, 3) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    # a class that never occurs nor is predicted (3) is left out; present but never predicted = 0
    assert macro_f1(pred, true, 4) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert macro_f1(np.array([0, 0]), np.array([0, 1]), 2) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="predictions"):
        accuracy(pred, true[:3])
