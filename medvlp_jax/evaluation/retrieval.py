"""Image-to-text and text-to-image retrieval Recall@K from embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medvlp_jax.evaluation.metrics import l2_normalize


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


def retrieval_metrics(
    img: np.ndarray,
    txt: np.ndarray,
    img_to_txt_gt: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K both ways by cosine similarity.

    Args:
      img: `[N, D]` image embeddings; txt: `[M, D]` text embeddings (normalised here).
      img_to_txt_gt: see `relevance_matrix` (default: text i belongs to image i).
      ks: the K values.
    Returns:
      `{'i2t_R@1': ..., 't2i_R@1': ..., ...}` as fractions in [0, 1] (not %). i2t: share of
      images with at least one of their texts in the top K; t2i: share of texts whose image
      (any relevant one) is in the top K. The `[N, M]` similarity is built in float64 on the
      host, which suits evaluation sets up to some 10^4 items per side.
    """
    img, txt = np.asarray(img), np.asarray(txt)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"img {img.shape} and txt {txt.shape} must be [N, D] and [M, D]")
    rel = relevance_matrix(img.shape[0], txt.shape[0], img_to_txt_gt)
    sim = l2_normalize(img) @ l2_normalize(txt).T
    out = {}
    for name, s, r in (("i2t", sim, rel), ("t2i", sim.T, rel.T)):
        for k, value in _recall_at(s, r, ks).items():
            out[f"{name}_R@{k}"] = value
    return out
