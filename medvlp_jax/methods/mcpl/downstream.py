"""MCPL's downstream classification: an MLP head on the frozen prompted image encoder.

    python -m medvlp_jax.methods.mcpl.downstream --workdir=DIR [--set downstream.epochs=30 ...]

Reads the MCPL run in DIR (its `config.json` and latest checkpoint) and embeds the train,
validate and test images with the frozen prompted image encoder, image-only (the AP keywords
come from the keyword predictor, as the method's evaluators use it). Since the encoder is
frozen, the features are computed once (no augmentation). Then, for each label fraction
(1% / 10% / 100%, a seeded stratified subset of the training rows), it trains the published
head `Linear(E, hidden) -> BN -> ReLU -> Linear(hidden, 14)` with masked multi-label BCE over
the CheXpert columns, scores macro AUROC on the validate split after every epoch, keeps the
best epoch and reports the test AUROC of that epoch. Model selection uses the validate split
only (the original code selects on the test split; we do not).

Writes `DIR/downstream.json` and prints it.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvlp_jax import config as config_lib
from medvlp_jax import weights
from medvlp_jax.data import pipeline, sources, tokenize
from medvlp_jax.data.records import CHEXPERT_CLASSES
from medvlp_jax.evaluate import Evaluator
from medvlp_jax.evaluation.linear_probe import stratified_subset
from medvlp_jax.evaluation.metrics import multilabel_auroc
from medvlp_jax.methods.base import get_method
from medvlp_jax.models.heads import MLPHead
from medvlp_jax.parallel import mesh as mesh_lib
from medvlp_jax.parallel.sharding import ACTIVATION_RULES, strip_boxes, variable_shardings


def default_downstream_config() -> ml_collections.ConfigDict:
    """`config.downstream` fields and their defaults."""
    d = ml_collections.ConfigDict()
    d.fractions = (0.01, 0.1, 1.0)
    d.hidden = 512
    d.epochs = 30
    d.batch_size = 64
    d.lr = 1e-3
    d.weight_decay = 1e-4
    d.max_train_examples = 0  # 0 = every training record
    d.seed = 0
    return d


def load_variables(method, workdir: Path, example: dict, mesh=None) -> dict:
    """`{'params'[, 'batch_stats']}` of `method`'s run in `workdir` (its latest checkpoint);
    `example` is a batch (arrays or `ShapeDtypeStruct`s) fixing the input shapes. Host arrays,
    or placed on `mesh` with the trainer's shardings."""
    boxed = jax.eval_shape(method.init, jax.random.PRNGKey(0), example)
    abstract = {k: v for k, v in strip_boxes(boxed).items() if k in weights.COLLECTIONS}
    whole_run = ml_collections.ConfigDict({"run": weights.load_spec(str(workdir))})
    loaded, _ = weights.loaded_leaves(
        whole_run, weights.flatten(abstract), method, weights.run_resolver(method.config)
    )
    variables = weights.overwrite(abstract, loaded)
    if mesh is None:
        return variables
    shardings = variable_shardings(boxed, mesh)
    return jax.device_put(variables, {k: shardings[k] for k in variables})


def embed_splits(config, workdir: Path) -> dict[str, dict]:
    """Frozen prompted image features of the train / validate / test splits:
    `{split: {'image' [N, E], 'labels' [N, 14], 'label_mask' [N, 14]}}`."""
    mesh = mesh_lib.make_mesh(config.mesh)
    method = get_method(config)
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    limit = config.downstream.max_train_examples
    records = {
        split: sources.load_records(config.data, split) for split in ("train", "validate", "test")
    }
    if limit:
        records["train"] = records["train"][:limit]
    evaluator = Evaluator(config, method, mesh, tokenizer)
    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        first = next(
            pipeline.eval_batches(
                config.data,
                records["train"],
                tokenizer,
                batch_size=config.data.eval_batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                hooks=method.data_hooks(tokenizer),
            )
        )
        example = mesh_lib.global_batch(mesh, {k: v for k, v in first.items() if k != "valid"})
        variables = load_variables(method, workdir, example, mesh)
        return {
            split: evaluator.embed_records(variables, recs, texts=False)
            for split, recs in records.items()
        }


def _bce(logits, labels, mask):
    per = optax.sigmoid_binary_cross_entropy(logits, labels) * mask
    return jnp.sum(per) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(head: MLPHead, tx, state, x, y, m):
    """One Adam step on a minibatch x [b, E], labels / mask [b, 14]; BN in training mode."""
    params, stats, opt_state = state

    def loss_fn(p):
        logits, updates = head.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return _bce(logits, y, m), updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), loss


@functools.partial(jax.jit, static_argnums=0)
def _predict(head: MLPHead, state, x):
    """Logits [N, 14] of features x [N, E]; BN with its running statistics."""
    return head.apply({"params": state[0], "batch_stats": state[1]}, x)


def train_head(head, tx, train: dict, val: dict, test: dict, rows: np.ndarray, cfg) -> dict:
    """Trains `head` (MLPHead) with `tx` on `train[rows]` for `cfg.epochs`; returns the
    best-validation epoch's metrics `{'auroc' (test), 'val_auroc', 'epoch', 'n_train'}`."""
    seed = cfg.seed
    x, y, m = (train[k][rows] for k in ("image", "labels", "label_mask"))
    batch = min(cfg.batch_size, len(x))
    variables = head.init(jax.random.PRNGKey(seed), x[:2], train=False)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    rng = np.random.default_rng(seed)
    best = {"val_auroc": -np.inf}
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(len(x))
        for start in range(0, len(x) - batch + 1, batch):  # drop_remainder: fixed shapes
            i = order[start : start + batch]
            state, _ = _train_step(head, tx, state, x[i], y[i], m[i])
        val_auroc = multilabel_auroc(
            np.asarray(_predict(head, state, val["image"])), val["labels"], val["label_mask"]
        )["macro"]
        if np.nan_to_num(val_auroc, nan=-1.0) > best["val_auroc"]:
            test_logits = np.asarray(_predict(head, state, test["image"]))
            auroc = multilabel_auroc(test_logits, test["labels"], test["label_mask"])["macro"]
            best = {"val_auroc": float(val_auroc), "auroc": float(auroc), "epoch": epoch}
    return {**best, "n_train": len(x)}


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Downstream classification of the MCPL run in `workdir` (module docstring) ->
    `{'downstream_auroc@<fraction>': test AUROC at the chosen epoch, and its
    'downstream_val_auroc@', 'downstream_epoch@', 'downstream_n_train@'}`."""
    features = embed_splits(config, Path(workdir))
    cfg = config.downstream
    train = features["train"]
    head = MLPHead((cfg.hidden, len(CHEXPERT_CLASSES)))
    tx = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    results = {}
    for fraction in cfg.fractions:
        rng = np.random.default_rng([cfg.seed, round(fraction * 1_000_000)])
        chosen = stratified_subset(
            train["labels"], train["label_mask"], fraction, rng, multilabel=True
        )
        rows = np.flatnonzero(chosen)
        res = train_head(head, tx, train, features["validate"], features["test"], rows, cfg)
        results[f"downstream_auroc@{fraction:g}"] = res["auroc"]
        results[f"downstream_val_auroc@{fraction:g}"] = res["val_auroc"]
        results[f"downstream_epoch@{fraction:g}"] = res["epoch"]
        results[f"downstream_n_train@{fraction:g}"] = res["n_train"]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medvlp_jax.methods.mcpl.downstream")
    parser.add_argument("--workdir", required=True, help="an MCPL run's work directory")
    parser.add_argument(
        "--config",
        default="",
        help="configs/mcpl.py[:preset]; default: the run's own WORKDIR/config.json",
    )
    parser.add_argument("--set", action="append", default=[], help="override a.b=value")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    if args.config:
        config = config_lib.load_config_file(args.config)
    elif (workdir / "config.json").is_file():
        config = config_lib.from_json((workdir / "config.json").read_text())
    else:
        raise SystemExit(f"--workdir={workdir} has no config.json: pass --config too")
    if config.get("method") != "mcpl":
        raise SystemExit(f"an MCPL run config is needed, found method {config.get('method')!r}")
    config = config_lib.apply_overrides(config, args.set)
    results = run(config, workdir)
    text = json.dumps(results, indent=2, sort_keys=True)
    if jax.process_index() == 0:
        (workdir / "downstream.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
