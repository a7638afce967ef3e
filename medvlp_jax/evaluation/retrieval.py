"""Image-to-text and text-to-image retrieval Recall@K, and the `retrieval` evaluator.

Scores come from embeddings (cosine of `embed_image` and `embed_text`), from a pair scorer
(`pair_score`, e.g. a fusion encoder's image-text matching head, over every image-text pair),
or from both: the embeddings pick each query's `rerank_k` best candidates and the pair scorer
re-orders those (ALBEF / PTUnifier style). With embeddings, also class Precision@K on the
zero-shot (CheXpert 5x200 style) set, as MedCLIP and BenchX report it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from medvlp_jax.evaluation.metrics import l2_normalize

PRED = {"image": "embed_image", "text": "embed_text", "pair": ""}
FIELDS = ("max_examples", "rerank_k", "precision_at")


def relevance_matrix(num_images: int, num_texts: int, gt: np.ndarray | None) -> np.ndarray:
    """`[N, M]` bool: `rel[i, j]` = text j is a correct match for image i.

    `gt` may be None (identity, needs N == M), an int array `[M]` giving each text's image
    index (several texts per image allowed), or a bool `[N, M]` matrix (any relation).
    """
    if gt is None:
        if num_images != num_texts:
            raise ValueError(f"identity ground truth needs N == M, got {num_images}, {num_texts}")
        return np.eye(num_images, dtype=bool)
    gt = np.asarray(gt)
    if gt.dtype == bool:
        if gt.shape != (num_images, num_texts):
            raise ValueError(f"bool gt {gt.shape} must be [N={num_images}, M={num_texts}]")
        return gt
    if gt.shape != (num_texts,) or gt.min() < 0 or gt.max() >= num_images:
        raise ValueError(f"int gt must be [M={num_texts}] image indices in [0, {num_images})")
    return np.arange(num_images)[:, None] == gt[None, :]


def _recall_at(sim: np.ndarray, rel: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries (rows) with a relevant item among the top k, for each k.

    The rank of a query's best relevant item is the number of *irrelevant* items scoring at
    least as high (ties count against the query, so constant scores give 0, never a lucky hit).
    Queries without any relevant item are excluded.
    """
    has_rel = rel.any(axis=1)
    best = np.where(rel, sim, -np.inf).max(axis=1, keepdims=True)
    rank = np.sum((sim >= best) & ~rel, axis=1)[has_rel]
    return {k: float(np.mean(rank < k)) for k in ks}


def precision_at_k(
    sim: np.ndarray,
    query_labels: np.ndarray,
    item_labels: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Class Precision@K: the share of each query's top-k items of the query's class.

    Args:
      sim: `[Q, M]` scores of every item for every query (higher = better).
      query_labels: `[Q]` int classes; item_labels: `[M]` int classes.
      ks: the K values, each <= M.
    Returns:
      `{k: mean over queries of (items of the query's class among its top k) / k}`. The top k
      are the k highest scores; equal scores rank the lower item index first (stable sort).
    """
    sim = np.asarray(sim)
    query_labels, item_labels = np.asarray(query_labels), np.asarray(item_labels)
    if sim.shape != (len(query_labels), len(item_labels)):
        raise ValueError(f"sim {sim.shape} must be [Q={len(query_labels)}, M={len(item_labels)}]")
    if max(ks) > sim.shape[1]:
        raise ValueError(f"ks {tuple(ks)} exceed the {sim.shape[1]} items")
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.cumsum(item_labels[order] == query_labels[:, None], axis=1)
    return {k: float(np.mean(hits[:, k - 1] / k)) for k in ks}


def class_precision_metrics(
    img: np.ndarray, txt: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Precision@K both ways by cosine similarity, a match being any item of the same class.

    Args:
      img: `[N, D]` image embeddings; txt: `[N, D]` text embeddings of the same N records.
      labels: `[N]` int class of each record (its image and its text alike).
      ks: the K values.
    Returns:
      `{'i2t_P@1': ..., 't2i_P@1': ..., ...}` as fractions in [0, 1].
    """
    sim = l2_normalize(img) @ l2_normalize(txt).T
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        for k, value in precision_at_k(s, labels, labels, ks).items():
            out[f"{name}_P@{k}"] = value
    return out


def score_metrics(
    i2t: np.ndarray,
    img_to_txt_gt: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    t2i: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@K both ways from score matrices (higher = better match).

    Args:
      i2t: `[N, M]` scores of every text for every image.
      img_to_txt_gt: see `relevance_matrix` (default: text i belongs to image i).
      ks: the K values.
      t2i: `[M, N]` scores of every image for every text; default `i2t.T` (one symmetric
        score; re-ranking gives each direction its own).
    Returns:
      `{'i2t_R@1': ..., 't2i_R@1': ..., ...}` as fractions in [0, 1] (not %). i2t: share of
      images with at least one of their texts in the top K; t2i: share of texts whose image
      (any relevant one) is in the top K.
    """
    i2t = np.asarray(i2t)
    t2i = i2t.T if t2i is None else np.asarray(t2i)
    if i2t.ndim != 2 or t2i.shape != i2t.shape[::-1]:
        raise ValueError(f"i2t {i2t.shape} must be [N, M] and t2i {t2i.shape} [M, N]")
    rel = relevance_matrix(i2t.shape[0], i2t.shape[1], img_to_txt_gt)
    out = {}
    for name, s, r in (("i2t", i2t, rel), ("t2i", t2i, rel.T)):
        for k, value in _recall_at(s, r, ks).items():
            out[f"{name}_R@{k}"] = value
    return out


def retrieval_metrics(
    img: np.ndarray,
    txt: np.ndarray,
    img_to_txt_gt: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K both ways by cosine similarity (`score_metrics` of the cosine matrix).

    Args:
      img: `[N, D]` image embeddings; txt: `[M, D]` text embeddings (normalised here).
      img_to_txt_gt, ks: as in `score_metrics`.
    Returns:
      As `score_metrics`. The `[N, M]` similarity is built in float64 on the host, which
      suits evaluation sets up to some 10^4 items per side.
    """
    img, txt = np.asarray(img), np.asarray(txt)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"img {img.shape} and txt {txt.shape} must be [N, D] and [M, D]")
    return score_metrics(l2_normalize(img) @ l2_normalize(txt).T, img_to_txt_gt, ks)


def rerank(
    sim: np.ndarray, k: int, score_pairs: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Re-orders each query's top-`k` candidates by a pair scorer.

    Args:
      sim: `[N, M]` first-stage scores (e.g. cosine); must lie in [-1, 1].
      k: candidates per query (image rows for i2t, text columns for t2i).
      score_pairs: `pairs [P, 2]` int (image index, text index) -> `[P]` scores; called once,
        on the union of both directions' candidates.
    Returns:
      `(i2t [N, M], t2i [M, N])` for `score_metrics`: a query's candidates rank above all its
      other items, in pair-score order; the others keep their first-stage order.
    """
    sim = np.asarray(sim, np.float64)
    n, m = sim.shape
    rows = np.argsort(-sim, axis=1, kind="stable")[:, : min(k, m)]  # [N, k] texts per image
    cols = np.argsort(-sim, axis=0, kind="stable")[: min(k, n)]  # [k, M] images per text
    for_image = np.zeros((n, m), bool)
    for_image[np.arange(n)[:, None], rows] = True
    for_text = np.zeros((n, m), bool)
    for_text[cols, np.arange(m)[None, :]] = True
    pairs = np.argwhere(for_image | for_text)
    pair = np.full((n, m), np.nan)
    pair[pairs[:, 0], pairs[:, 1]] = np.asarray(score_pairs(pairs), np.float64)

    def lift(candidates: np.ndarray) -> np.ndarray:
        # candidates -> [2, inf) in pair-score order, above every first-stage score (<= 1)
        return np.where(candidates, pair - np.nanmin(pair[candidates]) + 2.0, sim)

    return lift(for_image), lift(for_text).T


def same_text_relevance(texts: Sequence[str]) -> np.ndarray:
    """`[N, N]` bool: image i and text j match when report j is identical to report i
    (identical reports are equally correct answers: templated normal studies repeat)."""
    first = {t: i for i, t in reversed(list(enumerate(texts)))}
    groups = np.array([first[t] for t in texts])
    return groups[:, None] == groups[None, :]


def with_reports(five, labels: np.ndarray, test_records) -> tuple[list, np.ndarray]:
    """The zero-shot images' test records, which carry their reports (the zero-shot list is
    loaded image-only), and their labels; images without a usable report are left out.

    Raises:
      ValueError: none of the images has one (no text to retrieve).
    """
    by_image = {r.image_path: r for r in test_records}
    keep = [i for i, r in enumerate(five) if r.image_path in by_image]
    if not keep:
        raise ValueError(
            "retrieval Precision@K needs the zero-shot images' reports, and none of them is a "
            "test record with text; set evals.retrieval.precision_at=() to turn it off"
        )
    return [by_image[five[i].image_path] for i in keep], np.asarray(labels)[keep]


def check(cfg) -> None:
    """Roles: `image` + `text` (cosine retrieval), `pair` alone (every pair scored), or all
    three with `rerank_k` > 0 (the pair scorer re-ranks the embeddings' top-k)."""
    image, text, pair = (bool(cfg.pred.get(role)) for role in ("image", "text", "pair"))
    if image != text:
        raise ValueError("retrieval needs both pred.image and pred.text, or neither")
    if not (image or pair):
        raise ValueError("retrieval needs pred.image + pred.text, or pred.pair")
    if bool(cfg.rerank_k) != (image and pair):
        raise ValueError(
            "rerank_k > 0 goes with pred.image + pred.text + pred.pair (re-ranking), "
            f"rerank_k = 0 with one of them; got rerank_k={cfg.rerank_k} and pred={cfg.pred}"
        )


def run(ctx, preds: dict, cfg) -> dict[str, float]:
    """Recall@{1,5,10} both ways over the first `cfg.max_examples` test records; with
    embeddings also Precision@K for K in `cfg.precision_at` (() = off) both ways
    (`class_precision_metrics`, cosine only, not re-ranked) on the zero-shot set, each image
    with its own report (`with_reports`).

    With `preds['pair']` alone, `max_examples`^2 pairs are scored (in eval batches), so keep
    it small or re-rank (`rerank_k`) instead.
    """
    records = ctx.records("test")[: cfg.max_examples]
    gt = same_text_relevance([r.text for r in records])

    def score_pairs(pairs: np.ndarray) -> np.ndarray:
        return ctx.predict_pairs(records, pairs, preds["pair"])

    if "image" not in preds:
        n = len(records)
        every = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1)
        return score_metrics(score_pairs(every.reshape(-1, 2)).reshape(n, n), gt)
    embed = {"image": preds["image"], "text": preds["text"]}
    emb = ctx.predict_records(records, embed)
    if "pair" in preds:
        sim = l2_normalize(emb["image"]) @ l2_normalize(emb["text"]).T
        i2t, t2i = rerank(sim, cfg.rerank_k, score_pairs)
        out = score_metrics(i2t, gt, t2i=t2i)
    else:
        out = retrieval_metrics(emb["image"], emb["text"], gt)
    if not cfg.precision_at:
        return out
    five, labels = with_reports(*ctx.zero_shot_records(), ctx.records("test"))
    five_emb = ctx.predict_records(five, embed)
    ks = tuple(cfg.precision_at)
    return out | class_precision_metrics(five_emb["image"], five_emb["text"], labels, ks)
