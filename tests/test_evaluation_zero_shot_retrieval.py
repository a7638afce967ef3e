"""Zero-shot classification and retrieval Recall@K on constructed embeddings with known answers."""

import numpy as np
import pytest

from medvlp_jax.evaluation.retrieval import relevance_matrix, retrieval_metrics
from medvlp_jax.evaluation.zero_shot import class_embeddings, zero_shot_classify


def test_class_embeddings_normalise_templates_before_averaging():
    # Class 0: a huge template along x and a unit one along y -> normalised first, the class
    # direction is the diagonal (45 deg); a raw average would point along x (0.6 deg).
    # Class 1 points at 73 deg. An image at 55 deg is class 0 only with per-template norms.
    emb = np.array([[[100.0, 0.0], [0.0, 1.0]], [[0.3, 1.0], [3.0, 10.0]]])
    c1 = np.array([0.3, 1.0]) / np.hypot(0.3, 1.0)
    np.testing.assert_allclose(class_embeddings(emb), [[0.5**0.5, 0.5**0.5], c1], rtol=1e-12)
    img = np.array([[np.cos(np.radians(55)), np.sin(np.radians(55))], [0.2, 1.0], [1.0, 0.1]])
    res = zero_shot_classify(img, emb, labels=np.array([0, 1, 0]))
    np.testing.assert_array_equal(res["predictions"], [0, 1, 0])
    assert res["acc"] == 1.0 and res["macro_f1"] == 1.0
    assert res["scores"].shape == (3, 2)
    raw = emb.mean(axis=1)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.argmax(img[0] @ raw.T) == 1  # the case really tells the two recipes apart


def test_zero_shot_known_answer_and_metrics():
    rng = np.random.default_rng(0)
    classes = np.eye(5, 16)  # 5 orthogonal class directions
    templates = classes[:, None, :] * rng.uniform(0.5, 3.0, size=(5, 3, 1))  # K = 3, any norm
    labels = np.repeat(np.arange(5), 4)
    images = classes[labels] * 2.0 + rng.normal(scale=0.05, size=(20, 16))
    true_pred = labels.copy()
    images[0] = classes[3]  # one image of class 0 that looks like class 3
    true_pred[0] = 3
    res = zero_shot_classify(images, templates, labels)
    np.testing.assert_array_equal(res["predictions"], true_pred)
    assert res["acc"] == pytest.approx(19 / 20)
    # class 0: tp 3, fn 1 -> 6/7; class 3: tp 4, fp 1 -> 8/9; others 1.
    assert res["macro_f1"] == pytest.approx((6 / 7 + 8 / 9 + 3) / 5)
    single = zero_shot_classify(images, classes)  # [C, D] prompts, no labels
    np.testing.assert_array_equal(single["predictions"], true_pred)
    assert "acc" not in single
    with pytest.raises(ValueError, match="image_emb"):
        zero_shot_classify(images[:, :8], templates)


def _embed(sim):
    """Unit embeddings whose cosine matrix is exactly `sim` [N, M] (|entries| small)."""
    n, m = sim.shape
    img = np.eye(n, n + m)
    txt = np.zeros((m, n + m))
    txt[:, :n] = sim.T
    txt[np.arange(m), n + np.arange(m)] = np.sqrt(1 - np.sum(sim**2, axis=0))
    return img, txt


def test_retrieval_known_ranks():
    n = 20
    rng = np.random.default_rng(1)
    target_rank = np.array([0, 0, 0, 1, 2, 3, 4, 4, 5, 6, 7, 9, 9, 10, 12, 15, 19, 0, 8, 11])
    sim = np.zeros((n, n))
    for i in range(n):
        values = np.sort(rng.choice(np.arange(1, 1000), size=n, replace=False))[::-1] * 1e-4
        others = [j for j in range(n) if j != i]
        rng.shuffle(others)
        order = [*others[: target_rank[i]], i, *others[target_rank[i] :]]
        sim[i, order] = values  # text i sits at position target_rank[i] for image i
    img, txt = _embed(sim)
    np.testing.assert_allclose(img @ txt.T, sim, atol=1e-12)
    res = retrieval_metrics(img, txt)
    for k in (1, 5, 10):
        assert res[f"i2t_R@{k}"] == pytest.approx(np.mean(target_rank < k))
        # t2i reference: position of image j in the argsort of column j (no ties here)
        t2i_rank = [np.argsort(-sim[:, j]).tolist().index(j) for j in range(n)]
        assert res[f"t2i_R@{k}"] == pytest.approx(np.mean(np.array(t2i_rank) < k))


def test_retrieval_several_texts_per_image_and_ties():
    # 3 images, 6 texts: texts 2j, 2j+1 belong to image j.
    gt = np.array([0, 0, 1, 1, 2, 2])
    rel = relevance_matrix(3, 6, gt)
    assert rel.sum() == 6 and rel[1, 2] and rel[1, 3] and not rel[0, 2]
    sim = (
        np.array(
            [
                [0.0, 0.9, 0.95, 0.1, 0.0, 0.0],  # best own text (0.9) behind one other -> rank 1
                [0.0, 0.0, 0.2, 0.5, 0.0, 0.0],  # own text first -> rank 0
                [0.3, 0.3, 0.3, 0.3, 0.1, 0.2],  # own texts below 4 others -> rank 4
            ]
        )
        * 0.3
    )
    img, txt = _embed(sim)
    res = retrieval_metrics(img, txt, gt, ks=(1, 2, 5))
    assert res["i2t_R@1"] == pytest.approx(1 / 3)
    assert res["i2t_R@2"] == pytest.approx(2 / 3)
    assert res["i2t_R@5"] == pytest.approx(1.0)
    # t2i per text (column): text 0's own image scores 0, image 2 scores more and image 1
    # ties (ties count against) -> rank 2; text 2's own 0.2 is behind 0.95 and 0.3 -> rank 2.
    t2i = [2, 0, 2, 0, 0, 0]
    for k in (1, 2, 5):
        assert res[f"t2i_R@{k}"] == pytest.approx(np.mean(np.array(t2i) < k))
    # Constant embeddings: every tie counts against the query -> nothing is retrieved.
    flat = retrieval_metrics(np.ones((4, 3)), np.ones((4, 3)), ks=(1, 3, 4))
    assert flat["i2t_R@1"] == 0.0 and flat["t2i_R@3"] == 0.0 and flat["i2t_R@4"] == 1.0
    with pytest.raises(ValueError, match="int gt"):
        retrieval_metrics(img, txt, np.array([0, 1, 5, 0, 0, 0]))
    with pytest.raises(ValueError, match="identity"):
        retrieval_metrics(img, txt)
