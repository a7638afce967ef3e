"""Linear-probe evaluation: a logistic-regression head on frozen features, trained on a seeded,
stratified fraction of the training labels, scored on the test split; and the `linear_probe`
evaluator (the 14 CheXpert labels, macro AUROC).

The head is fitted full-batch with L-BFGS (`optax.lbfgs`, zoom line search) on standardised
features; all fractions share one compiled solver (the subset is a 0/1 weight over the full
training set, so shapes never change). Hyperparameters (the l2 strength) are selected on a
validation split only, never on the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medvlp_jax.evaluation.metrics import accuracy, macro_f1, multilabel_auroc

# features: any [B, D] predict function (an image embedding by default; a method may probe
# its text-only or fused features instead).
PRED = {"features": "embed_image"}
# fractions: label fractions of the training split; steps: L-BFGS iterations;
# max_train_examples: the first N training records; l2_grid: chosen on the validate split.
FIELDS = ("fractions", "steps", "max_train_examples", "l2_grid")


def stratified_subset(
    labels: np.ndarray,
    mask: np.ndarray | None,
    fraction: float,
    rng: np.random.Generator | None,
    *,
    multilabel: bool,
) -> np.ndarray:
    """Chooses `fraction` of the training rows; returns a `[N]` bool selection.

    Multi-label (`labels` `[N, C]` 0/1, `mask` `[N, C]` known entries): first, for every column,
    one random row with a known positive and one with a known negative (where they exist and
    are not yet covered), then random rows up to `round(fraction * N)` (never fewer than the
    covering rows, so tiny fractions may slightly exceed their share).
    Multi-class (`labels` `[N]` int, `mask` `[N]` valid rows): `max(1, round(fraction * n_c))`
    random rows of each class c (exact per-class stratification).
    `fraction >= 1` selects every (valid) row; `rng` is only used below 1.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    known = np.ones(labels.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if fraction <= 0:
        raise ValueError(f"linear-probe fraction must be > 0, got {fraction}")
    if fraction >= 1:
        return np.ones(n, bool) if multilabel else known.copy()
    order = rng.permutation(n)
    chosen = np.zeros(n, bool)
    if not multilabel:
        for c in np.unique(labels[known]):
            rows = order[(known & (labels == c))[order]]
            chosen[rows[: max(1, round(fraction * rows.size))]] = True
        return chosen
    for c in range(labels.shape[1]):
        for value in (1, 0):
            has = known[:, c] & (labels[:, c] == value)
            if not (chosen & has).any() and has.any():
                chosen[order[has[order]][0]] = True
    budget = max(1, round(fraction * n)) - int(chosen.sum())
    chosen[order[~chosen[order]][: max(0, budget)]] = True
    return chosen


@partial(jax.jit, static_argnames=("multilabel", "steps"))
def _fit_logistic(x, targets, weights, l2, *, multilabel: bool, steps: int):
    """L-BFGS fit of `W [D, C], b [C]` on standardised `x [N, D]`.

    Multi-label: `targets [N, C]` 0/1 and `weights [N, C]` (BCE per entry).
    Multi-class: `targets [N, C]` one-hot and `weights [N, 1]` (softmax CE per row).
    Objective: weighted mean loss + `0.5 * l2 * ||W||^2` (bias not penalised).
    """

    def objective(params):
        w, b = params
        logits = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST) + b
        if multilabel:
            per = optax.sigmoid_binary_cross_entropy(logits, targets)
        else:
            per = optax.softmax_cross_entropy(logits, targets)[:, None]
        data = jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        return data + 0.5 * l2 * jnp.sum(w * w)

    params = (jnp.zeros((x.shape[1], targets.shape[1])), jnp.zeros(targets.shape[1]))
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(_, carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(
            grad, state, params, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(params, updates), state

    params, _ = jax.lax.fori_loop(0, steps, step, (params, solver.init(params)))
    return params


def _standardizer(feats: np.ndarray, rows: np.ndarray):
    """Returns `f(x) = (x - mean) / std` with the statistics of `feats[rows]`."""
    sub = feats[rows]
    mean, std = sub.mean(axis=0), np.maximum(sub.std(axis=0), 1e-6)
    return lambda x: ((np.asarray(x, np.float64) - mean) / std).astype(np.float32)


def _score(params, x: np.ndarray, labels, mask, multilabel: bool, class_names) -> dict:
    """Test/validation metrics of a fitted head on standardised features."""
    w, b = params
    logits = np.asarray(x @ np.asarray(w) + np.asarray(b))
    if multilabel:
        res = multilabel_auroc(logits, labels, mask, class_names)
        return {"auroc": res["macro"], "per_class": res["per_class"], "skipped": res["skipped"]}
    valid = np.ones(len(labels), bool) if mask is None else np.asarray(mask).astype(bool)
    pred, true = logits.argmax(axis=1)[valid], np.asarray(labels)[valid]
    return {
        "accuracy": accuracy(pred, true),
        "macro_f1": macro_f1(pred, true, logits.shape[1]),
    }


def linear_probe(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    train_mask: np.ndarray | None,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    test_mask: np.ndarray | None,
    *,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seed: int = 0,
    multilabel: bool = True,
    steps: int = 300,
    l2: float | Sequence[float] = 1e-3,
    val: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[float, dict]:
    """Logistic-regression probe per label fraction.

    Args:
      train_feats: `[N, D]` frozen features; test_feats: `[N_test, D]`.
      train_labels, test_labels: multi-label `[N, C]` 0/1 (NaN allowed where masked);
        multi-class `[N]` int.
      train_mask, test_mask: `[N, C]` (multi-label) / `[N]` (multi-class) known entries, or None.
      fractions: label fractions; each gets its own seeded stratified subset
        (`stratified_subset`, rng seeded by `(seed, fraction)`).
      seed: subset seed.
      multilabel: sigmoid/BCE head scored by macro AUROC (True) or softmax head scored by
        accuracy and macro-F1 (False).
      steps: L-BFGS iterations.
      l2: penalty `0.5 * l2 * ||W||^2` on standardised features, or a grid of values; a grid
        of more than one value is searched on `val` (required then), never on the test split.
      val: `(feats, labels, mask)` validation split for the l2 search.
      num_classes: multi-class only; default `max(label) + 1` over train and test.
      class_names: multi-label column names for the per-class report.
    Returns:
      `{fraction: {'auroc', 'per_class', 'skipped'}` (multi-label) or
      `{'accuracy', 'macro_f1'}` (multi-class), plus `'n_train'` (rows used), `'l2'` (chosen),
      `'val'` (the chosen value's validation metric, None without a search)}`.
    """
    train_feats = np.asarray(train_feats, np.float32)
    train_labels = np.asarray(train_labels)
    grid = [float(l2)] if np.isscalar(l2) else [float(v) for v in l2]
    if len(grid) > 1 and val is None:
        raise ValueError("linear_probe: an l2 grid needs a validation split (`val=`)")
    if multilabel:
        known = np.ones(train_labels.shape, bool) if train_mask is None else train_mask > 0
        targets = np.nan_to_num(train_labels.astype(np.float32))  # masked: weight 0
        row_weights = known.astype(np.float32)
        metric = "auroc"
    else:
        num_classes = num_classes or int(max(train_labels.max(), np.max(test_labels))) + 1
        known = np.ones(len(train_labels), bool) if train_mask is None else train_mask > 0
        classes = np.where(known, train_labels, 0).astype(np.int64)
        targets = np.eye(num_classes, dtype=np.float32)[classes]
        row_weights = known.astype(np.float32)[:, None]
        metric = "accuracy"

    results = {}
    for fraction in fractions:
        rng = np.random.default_rng([seed, round(fraction * 1_000_000)])
        rows = stratified_subset(train_labels, train_mask, fraction, rng, multilabel=multilabel)
        standardize = _standardizer(train_feats, rows)
        x = standardize(train_feats)
        weights = row_weights * rows[:, None]
        fit = partial(_fit_logistic, x, targets, weights, multilabel=multilabel, steps=steps)
        fits = {v: fit(jnp.float32(v)) for v in grid}
        chosen, val_metric = grid[0], None
        if len(grid) > 1:
            val_feats, val_labels, val_mask = val
            scores = {
                v: _score(p, standardize(val_feats), val_labels, val_mask, multilabel, class_names)
                for v, p in fits.items()
            }
            chosen = max(grid, key=lambda v: np.nan_to_num(scores[v][metric], nan=-1.0))
            val_metric = scores[chosen][metric]
        res = _score(
            fits[chosen], standardize(test_feats), test_labels, test_mask, multilabel, class_names
        )
        results[fraction] = {**res, "n_train": int(rows.sum()), "l2": chosen, "val": val_metric}
    return results


def run(ctx, preds: dict, cfg) -> dict[str, float]:
    """Macro AUROC of a probe on `preds['features']` (`[B, D]`) per label fraction:
    `{'linear_probe_auroc@<fraction>': ...}`."""
    fns = {"features": preds["features"]}
    train = ctx.predict_records(ctx.records("train")[: cfg.max_train_examples], fns)
    val = ctx.predict_records(ctx.records("validate"), fns)
    test = ctx.predict_records(ctx.records("test"), fns)
    results = linear_probe(
        train["features"],
        train["labels"],
        train["label_mask"],
        test["features"],
        test["labels"],
        test["label_mask"],
        fractions=tuple(cfg.fractions),
        seed=ctx.seed,
        steps=cfg.steps,
        l2=tuple(cfg.l2_grid),
        val=(val["features"], val["labels"], val["label_mask"]),
    )
    return {
        f"linear_probe_auroc@{fraction:g}": result["auroc"] for fraction, result in results.items()
    }
