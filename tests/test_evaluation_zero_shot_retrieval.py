"""Zero-shot classification and retrieval Recall@K on constructed embeddings with known answers."""

from types import SimpleNamespace

import numpy as np
import pytest

from medvlp_jax.evaluation import retrieval
from medvlp_jax.evaluation.metrics import l2_normalize
from medvlp_jax.evaluation.retrieval import (
    class_precision_metrics,
    precision_at_k,
    relevance_matrix,
    retrieval_metrics,
)
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


def test_precision_at_k_by_hand_with_ties():
    sim = np.array([[0.5, 0.9, 0.5, 0.1], [0.2, 0.2, 0.2, 0.3]])
    items, queries = np.array([0, 1, 1, 0]), np.array([0, 1])
    # Query 0 (class 0): item 1, then the 0.5 tie in index order: items 0, 2, then 3 ->
    # classes 1, 0, 1, 0 -> hits 0, 1, 0, 1. Query 1 (class 1): item 3, then the tie 0, 1, 2
    # -> classes 0, 0, 1, 1 -> hits 0, 0, 1, 1. (Ties broken by the higher index instead:
    # query 0 P@2 = 0, query 1 P@2 = 1/2 and P@3 = 2/3, so the mean P@3 would be 1/2.)
    res = precision_at_k(sim, queries, items, ks=(1, 2, 3, 4))
    assert res[1] == 0.0
    assert res[2] == pytest.approx((1 / 2 + 0) / 2)
    assert res[3] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert res[4] == pytest.approx((2 / 4 + 2 / 4) / 2)
    flipped = precision_at_k(sim[:, ::-1], queries, items[::-1], ks=(3,))
    assert flipped[3] == pytest.approx((1 / 3 + 2 / 3) / 2)  # reversed items: the other order
    with pytest.raises(ValueError, match="exceed"):
        precision_at_k(sim, queries, items, ks=(5,))
    with pytest.raises(ValueError, match=r"\[Q=3, M=4\]"):
        precision_at_k(sim, np.array([0, 1, 1]), items)


class _FakeContext:
    """The evaluator context `retrieval.run` uses, on records carrying their embeddings:
    `predict_records` looks the role's attribute up, `predict_pairs` returns cosines."""

    def __init__(self, test, five, labels, all_test=None):
        self.test, self.five, self.labels = test, five, labels
        self.all_test = test if all_test is None else all_test

    def records(self, split):
        assert split == "test"
        return self.all_test

    def zero_shot_records(self):
        return self.five, self.labels

    def predict_records(self, records, fns):
        return {role: np.stack([getattr(r, name) for r in records]) for role, name in fns.items()}

    def predict_pairs(self, records, pairs, fn):
        img, txt = (
            l2_normalize(np.stack([getattr(r, a) for r in records])) for a in ("img", "txt")
        )
        return np.sum(img[pairs[:, 0]] * txt[pairs[:, 1]], axis=1)


def test_retrieval_run_adds_precision_on_the_zero_shot_set():
    rng = np.random.default_rng(2)

    def record(text, path):
        return SimpleNamespace(
            text=text, image_path=path, img=rng.normal(size=6), txt=rng.normal(size=6)
        )

    test = [record(f"report {i % 5}", f"t{i}") for i in range(8)]
    test += [record(f"five {i}", f"f{i}") for i in range(12)]
    # The zero-shot list is loaded image-only (no text): its images' test records are used,
    # and an image without a test record (f12) is left out.
    listed = [SimpleNamespace(text="", image_path=f"f{i}") for i in range(13)]
    labels = np.append(np.repeat(np.arange(4), 3), 3)
    ctx = _FakeContext(test[:8], listed, labels, test)
    five, labels = test[8:], labels[:12]
    cfg = SimpleNamespace(max_examples=6, rerank_k=0, precision_at=(1, 5, 10))
    res = retrieval.run(ctx, {"image": "img", "text": "txt"}, cfg)
    recall = {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    precision = {f"{d}_P@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(res) == recall | precision
    img, txt = (np.stack([getattr(r, a) for r in five]) for a in ("img", "txt"))
    assert {k: res[k] for k in precision} == class_precision_metrics(img, txt, labels)
    sim = img @ txt.T / np.outer(np.linalg.norm(img, axis=1), np.linalg.norm(txt, axis=1))
    for k in (1, 5, 10):
        assert res[f"i2t_P@{k}"] == pytest.approx(precision_at_k(sim, labels, labels)[k])
        assert res[f"t2i_P@{k}"] == pytest.approx(precision_at_k(sim.T, labels, labels)[k])
    assert res["i2t_P@1"] != res["t2i_P@1"] or res["i2t_P@5"] != res["t2i_P@5"]
    pairs_only = retrieval.run(ctx, {"pair": "pair"}, cfg)  # pair scoring: no embeddings
    assert set(pairs_only) == recall
    for key in recall:
        assert pairs_only[key] == pytest.approx(res[key])
    cfg.precision_at = ()  # off
    assert set(retrieval.run(ctx, {"image": "img", "text": "txt"}, cfg)) == recall
    cfg.precision_at = (1,)
    unlisted = _FakeContext(test[:8], [SimpleNamespace(text="", image_path="x")], labels[:1])
    with pytest.raises(ValueError, match=r"precision_at=\(\)"):
        retrieval.run(unlisted, {"image": "img", "text": "txt"}, cfg)
