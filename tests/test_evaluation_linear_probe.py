"""Linear probe: stratified subsets, known answers (separable -> ~1, random -> ~0.5), and
hyperparameter selection on the validation split only."""

import numpy as np
import pytest

from medvlp_jax.evaluation.linear_probe import linear_probe, stratified_subset

N, N_TEST, D, C = 400, 200, 12, 4


def _separable(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, C))
    x, x_test = rng.normal(size=(N, D)), rng.normal(size=(N_TEST, D))
    return x, (x @ w > 0).astype(np.float32), x_test, (x_test @ w > 0).astype(np.float32)


def test_stratified_subset_multilabel_covers_every_column():
    rng = np.random.default_rng(0)
    labels = (rng.random((N, C)) < [0.5, 0.1, 0.02, 0.9]).astype(np.float32)
    mask = rng.random((N, C)) < 0.8
    labels[~mask] = np.nan  # unknown entries must never be picked as positives/negatives
    rows = stratified_subset(labels, mask, 0.01, np.random.default_rng(1), multilabel=True)
    assert rows.sum() >= round(0.01 * N)
    for c in range(C):
        known = labels[rows & mask[:, c], c]
        assert (known == 1).any() and (known == 0).any()
    again = stratified_subset(labels, mask, 0.01, np.random.default_rng(1), multilabel=True)
    np.testing.assert_array_equal(rows, again)
    tenth = stratified_subset(labels, mask, 0.1, np.random.default_rng(1), multilabel=True)
    assert tenth.sum() == 40
    assert stratified_subset(labels, mask, 1.0, None, multilabel=True).all()


def test_stratified_subset_multiclass_exact_per_class():
    labels = np.repeat([0, 1, 2], [200, 100, 20])
    valid = np.ones(len(labels), bool)
    valid[:10] = False
    rows = stratified_subset(labels, valid, 0.1, np.random.default_rng(0), multilabel=False)
    assert [int(np.sum(rows & (labels == c))) for c in range(3)] == [19, 10, 2]
    assert not rows[:10].any()
    with pytest.raises(ValueError, match="fraction"):
        stratified_subset(labels, valid, 0.0, np.random.default_rng(0), multilabel=False)


def test_separable_features_reach_auroc_one_and_random_ones_half():
    x, y, x_test, y_test = _separable()
    res = linear_probe(x, y, None, x_test, y_test, None, fractions=(0.1, 1.0), steps=100)
    assert res[1.0]["auroc"] > 0.98 and res[1.0]["n_train"] == N
    assert res[0.1]["auroc"] > 0.85 and res[0.1]["n_train"] == 40
    assert res[1.0]["auroc"] >= res[0.1]["auroc"] and res[1.0]["skipped"] == []
    rng = np.random.default_rng(1)
    y_rand = (rng.random((N, C)) < 0.5).astype(np.float32)
    y_test_rand = (rng.random((N_TEST, C)) < 0.5).astype(np.float32)
    rand = linear_probe(x, y_rand, None, x_test, y_test_rand, None, fractions=(1.0,), steps=100)
    assert abs(rand[1.0]["auroc"] - 0.5) < 0.08


def test_masked_training_labels_are_ignored():
    x, y, x_test, y_test = _separable(seed=2)
    mask = np.ones_like(y)
    mask[: N // 2] = 0
    y_corrupt = y.copy()
    y_corrupt[: N // 2] = 1 - y_corrupt[: N // 2]  # flipped, but masked out
    clean = linear_probe(x, y, mask, x_test, y_test, None, fractions=(1.0,), steps=100)
    masked = linear_probe(x, y_corrupt, mask, x_test, y_test, None, fractions=(1.0,), steps=100)
    assert masked[1.0]["auroc"] == pytest.approx(clean[1.0]["auroc"], abs=1e-6)
    assert masked[1.0]["auroc"] > 0.97


def test_multiclass_and_validation_only_selection():
    x, _, x_test, _ = _separable(seed=3)
    w = np.random.default_rng(4).normal(size=(D, 3))
    labels, test_labels = np.argmax(x @ w, 1), np.argmax(x_test @ w, 1)
    val = (x_test[:100], test_labels[:100], None)
    test_x, test_y = x_test[100:], test_labels[100:]
    kwargs = dict(fractions=(1.0,), multilabel=False, steps=100, l2=(1e-4, 10.0), val=val)
    res = linear_probe(x, labels, None, test_x, test_y, None, **kwargs)[1.0]
    assert res["l2"] == 1e-4 and res["accuracy"] > 0.85 and res["val"] > 0.85
    assert 0 < res["macro_f1"] <= 1
    # The choice depends on the validation split only: scrambled test labels change nothing.
    scrambled = np.random.default_rng(5).permutation(test_y)
    res2 = linear_probe(x, labels, None, test_x, scrambled, None, **kwargs)[1.0]
    assert (res2["l2"], res2["val"]) == (res["l2"], res["val"])
    assert res2["accuracy"] < 0.6
    with pytest.raises(ValueError, match="validation"):
        linear_probe(x, labels, None, test_x, test_y, None, multilabel=False, l2=(1e-3, 1e-2))
