"""Evaluators built from `config.evals`: types and predict functions by name (errors at
construction), several evals of one type, zero-shot classes/templates from the config, and
pair-score retrieval (all pairs, or re-ranking) against the embedding path on a fake method."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax import config as config_lib
from medvlp_jax import evaluate
from medvlp_jax.config import ConfigError
from medvlp_jax.data import sources, tokenize
from medvlp_jax.evaluation.retrieval import rerank, retrieval_metrics, score_metrics
from medvlp_jax.evaluation.zero_shot import zero_shot_classify
from medvlp_jax.methods.base import Method
from medvlp_jax.parallel import mesh as mesh_lib

ROOT = Path(__file__).resolve().parents[1]
D = 8


class FakeMethod(Method):
    """Fixed random projections: image = pixels @ w_img, text = mean of token rows of w_txt;
    `pair_score` = their cosine, row by row (what a perfect fusion head of them would say)."""

    def embed_images(self, variables, batch):
        x = batch["image"].reshape(batch["image"].shape[0], -1)
        return x @ variables["w_img"]

    def embed_texts(self, variables, batch):
        mask = batch["attention_mask"][..., None].astype(jnp.float32)
        return jnp.sum(variables["w_txt"][batch["input_ids"]] * mask, 1) / jnp.sum(mask, 1)

    def pair_score(self, variables, batch):
        def unit(z):
            return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

        img, txt = self.embed_images(variables, batch), self.embed_texts(variables, batch)
        return jnp.sum(unit(img) * unit(txt), axis=-1)

    def predict_fns(self):
        return {**super().predict_fns(), "pair_score": self.pair_score}


class _State:
    def __init__(self, variables):
        self._variables = variables

    def variables(self):
        return self._variables


def _config(*overrides: str):
    config = config_lib.load_config_file(str(ROOT / "configs/clip.py:tiny"))
    return config_lib.apply_overrides(config, ["evals.linear_probe.enabled=false", *overrides])


@pytest.fixture(scope="module")
def setup():
    config = _config()
    mesh = mesh_lib.make_mesh(config.mesh)
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    pixels = config.data.image_size**2 * config.data.channels
    k1, k2 = jax.random.split(jax.random.key(0))
    variables = {
        "w_img": jax.random.normal(k1, (pixels, D)),
        "w_txt": jax.random.normal(k2, (tokenizer.vocab_size, D)),
    }
    return mesh, tokenizer, _State(variables)


def _run(setup, config, method=None):
    mesh, tokenizer, state = setup
    evaluator = evaluate.Evaluator(config, method or FakeMethod(config), mesh, tokenizer)
    with jax.set_mesh(mesh):
        return evaluator, evaluator.run(state)


def test_metric_keys_as_before(setup):
    _, metrics = _run(setup, _config())
    at = ("1", "5", "10")
    expected = {"zero_shot_acc", "zero_shot_macro_f1"}
    expected |= {f"{d}_{m}@{k}" for d in ("i2t", "t2i") for m in ("R", "P") for k in at}
    assert set(metrics) == {f"eval/synthcxr/{k}" for k in expected}


def test_unknown_type_pred_role_and_fields_fail_at_construction(setup):
    mesh, tokenizer, _ = setup

    def build(*overrides, edit=None):
        config = _config(*overrides)
        if edit:
            edit(config)
        return evaluate.Evaluator(config, FakeMethod(config), mesh, tokenizer)

    with pytest.raises(ConfigError, match=r"config\.evals\.retrieval\.type='retrival'.*zero_shot"):
        build("evals.retrieval.type=retrival")
    with pytest.raises(ConfigError, match=r"evals\.zero_shot\.pred\.text='embed_txt'.*embed_text"):
        build(
            edit=lambda c: c.evals.zero_shot.update(
                pred={"image": "embed_image", "text": "embed_txt"}
            )
        )
    with pytest.raises(ConfigError, match=r"evals\.zero_shot\.pred has roles \['img'\]"):
        build(edit=lambda c: c.evals.zero_shot.update(pred={"img": "embed_image"}))
    with pytest.raises(ConfigError, match=r"evals\.retrieval: unknown fields \['rerank'\]"):
        build(edit=lambda c: c.evals.retrieval.update(rerank=3))
    with pytest.raises(ConfigError, match=r"missing fields \['precision_at', 'rerank_k'\]"):
        build(edit=lambda c: c.evals.update(r2={"type": "retrieval", "max_examples": 8}))
    with pytest.raises(ConfigError, match=r"evals\.retrieval: rerank_k > 0 goes with"):
        build("evals.retrieval.rerank_k=5")
    with pytest.raises(ConfigError, match=r"evals\.zero_shot: classes \['Fracture'\]"):
        build("evals.zero_shot.classes=Fracture")
    # A disabled eval's predict functions are not required of the method...
    only_pairs = {"pair": "pair_score"}
    build("evals.zero_shot.enabled=false", edit=lambda c: c.evals.retrieval.update(pred=only_pairs))
    # ...an enabled one's are: base Method has no embed_* (nothing implemented).
    config = _config()
    with pytest.raises(ConfigError, match=r"pred\.image='embed_image'; the method's predict"):
        evaluate.Evaluator(config, Method(config), mesh, tokenizer)


def test_two_evals_of_one_type(setup):
    config = _config("evals.zero_shot.enabled=false", "evals.retrieval.max_examples=48")
    config.evals.retrieval_small = config.evals.retrieval.copy_and_resolve_references()
    config.evals.retrieval_small.max_examples = 16
    evaluator, metrics = _run(setup, config)
    assert len(metrics) == 24  # 6 R@K + 6 P@K per retrieval eval, and 2 of them
    emb = evaluator.embed_records(setup[2].variables(), evaluator.records("test")[:16])
    texts = [r.text for r in evaluator.records("test")[:16]]
    gt = np.array([[a == b for b in texts] for a in texts])
    for key, value in retrieval_metrics(emb["image"], emb["text"], gt).items():
        assert metrics[f"eval/synthcxr/retrieval_small/{key}"] == pytest.approx(value)
    assert metrics["eval/synthcxr/i2t_R@1"] != metrics["eval/synthcxr/retrieval_small/i2t_R@1"]


def test_zero_shot_classes_and_templates_from_config(setup):
    config = _config(
        "evals.retrieval.enabled=false",
        "evals.zero_shot.classes=Edema,Cardiomegaly",
        "evals.zero_shot.templates=there is {} here",
    )
    evaluator, metrics = _run(setup, config)
    # independently: the two classes' images, their one prompt each, labels 0 = Edema
    records, labels = sources.load_zero_shot_records(config.data)
    names = np.array(sources.ZERO_SHOT_CLASSES)[labels]
    keep = np.isin(names, ["Edema", "Cardiomegaly"])
    variables = setup[2].variables()
    images = evaluator.embed_records(variables, [r for r, k in zip(records, keep) if k], False)
    prompts = evaluator.embed_text_list(
        variables, ["there is edema here", "there is cardiomegaly here"]
    )
    expected = zero_shot_classify(images["image"], prompts, (names[keep] == "Cardiomegaly") * 1)
    assert len(images["image"]) == keep.sum() < len(records)
    assert metrics["eval/synthcxr/zero_shot_acc"] == pytest.approx(expected["acc"])
    assert metrics["eval/synthcxr/zero_shot_macro_f1"] == pytest.approx(expected["macro_f1"])
    _, five = _run(setup, _config("evals.retrieval.enabled=false"))
    assert five["eval/synthcxr/zero_shot_acc"] != metrics["eval/synthcxr/zero_shot_acc"]


def test_pair_score_retrieval_equals_embedding_retrieval(setup):
    config = _config("evals.zero_shot.enabled=false", "evals.retrieval.max_examples=40")
    config.evals.pairs = config.evals.retrieval.copy_and_resolve_references()
    config.evals.pairs.pred = {"pair": "pair_score"}
    config.evals.reranked = config.evals.retrieval.copy_and_resolve_references()
    config.evals.reranked.pred = {
        "image": "embed_image",
        "text": "embed_text",
        "pair": "pair_score",
    }
    config.evals.reranked.rerank_k = 3
    _, metrics = _run(setup, config)
    plain = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.count("/") == 2 and "_R@" in k}
    assert len(plain) == 6 and plain["i2t_R@10"] > 0  # not trivially equal
    for name in ("pairs", "reranked"):
        for key, value in plain.items():
            assert metrics[f"eval/synthcxr/{name}/{key}"] == value, (name, key)


def test_rerank_known_answer():
    """A perfect pair scorer re-ranks each query's top-k: R@1 becomes the share of queries
    whose match is among the first stage's top k; beyond k the first-stage ranks stand."""
    rng = np.random.default_rng(0)
    n, k = 30, 4
    sim = np.tanh(rng.normal(size=(n, n)))

    def perfect(pairs):
        return (pairs[:, 0] == pairs[:, 1]).astype(float)

    i2t, t2i = rerank(sim, k, perfect)
    first = score_metrics(sim, ks=(1, k, 10))
    again = score_metrics(i2t, ks=(1, k, 10), t2i=t2i)
    assert again["i2t_R@1"] == first[f"i2t_R@{k}"] and again["t2i_R@1"] == first[f"t2i_R@{k}"]
    assert again["i2t_R@10"] == first["i2t_R@10"] and again["t2i_R@10"] == first["t2i_R@10"]
    assert first["i2t_R@1"] < again["i2t_R@1"]
    calls = []
    rerank(sim, k, lambda pairs: calls.append(len(pairs)) or perfect(pairs))
    assert k * n <= calls[0] <= 2 * k * n  # only candidates are scored, once
