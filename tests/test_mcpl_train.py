"""MCPL end to end on tiny sizes: backbone pre-training into the cache, prompt tuning with a
frozen backbone, image-only inference, ablation variants, downstream classification, and a
Hugging Face CLIP folder as the backbone."""

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medvlp_jax import optim, prerequisites, train, weights
from medvlp_jax.config import apply_overrides, load_config_file, to_json
from medvlp_jax.data.tokenize import default_tokenizer_path
from medvlp_jax.downstream import runner
from medvlp_jax.methods.base import get_method
from medvlp_jax.methods.mcpl.model import McplModel
from medvlp_jax.models.builders import build_image_tower, build_text_tower, tower_config
from medvlp_jax.models.clip import CLIPModel
from medvlp_jax.models.convert import export_hf
from medvlp_jax.models.testing import random_variables

MCPL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mcpl.py"


def tiny_config(**overrides):
    config = load_config_file(f"{MCPL_CONFIG}:tiny")
    return apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny MCPL run with a fresh cache: the backbone is pre-trained first."""
    root = tmp_path_factory.mktemp("mcpl")
    evals = {f"evals.{name}.enabled": False for name in ("zero_shot", "linear_probe")}
    config = tiny_config(**{"data.cache_dir": root / "cache", **evals})
    (root / "run").mkdir()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        metrics = train.run(config, root / "run")
    return SimpleNamespace(
        config=config,
        workdir=root / "run",
        metrics=metrics,
        stdout=stdout.getvalue(),
        backbone=prerequisites.run_dir(config, "backbone"),
    )


def _state(run_dir: Path, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")


def _size(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _batch(config, method, n=4) -> dict:
    from medvlp_jax.data import pipeline, sources, tokenize

    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    records = sources.load_records(config.data, "test")[:n]
    batch = next(
        pipeline.eval_batches(
            config.data, records, tokenizer, batch_size=n, hooks=method.data_hooks(tokenizer)
        )
    )
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "valid"}


def test_pretrains_backbone_then_tunes_prompts(tiny_run):
    assert "prerequisite 'backbone' (clip) is not in the cache" in tiny_run.stdout
    assert (tiny_run.backbone / "checkpoints" / "2").is_dir()  # backbone.train.num_steps
    assert (tiny_run.workdir / "checkpoints" / "2").is_dir()
    assert {"eval/synthcxr/i2t_R@1", "eval/synthcxr/t2i_R@1"} <= set(tiny_run.metrics)
    logged = [json.loads(line) for line in (tiny_run.workdir / "metrics.jsonl").open()]
    train_keys = set().union(*logged)
    assert {"train/loss_relation", "train/keyword_bce", "train/loss_clip"} <= train_keys
    # a second method instance finds the cached backbone and trains nothing
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        folder = prerequisites.ensure(tiny_run.config, "backbone")
    assert folder == tiny_run.backbone
    assert stdout.getvalue() == ""


def test_frozen_backbone_is_bit_identical_and_has_no_optimizer_state(tiny_run):
    final = _state(tiny_run.workdir, 2)
    pretrained = _state(tiny_run.backbone, 2)["params"]
    got = jax.tree_util.tree_flatten_with_path(final["params"]["backbone"])[0]
    want = dict(jax.tree_util.tree_flatten_with_path(pretrained)[0])
    assert len(got) == len(want)
    for path, value in got:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]))
    prompts = {k: v for k, v in final["params"].items() if k != "backbone"}
    # AdamW moments (2 per trainable value) and step counters, nothing for the backbone
    assert 2 * _size(prompts) <= _size(final["opt_state"]) <= 2 * _size(prompts) + 64
    earlier = _state(tiny_run.workdir, 1)["params"]
    assert not np.array_equal(earlier["text_prompts"], final["params"]["text_prompts"])
    assert not np.array_equal(earlier["ap_posemb"], final["params"]["ap_posemb"])


def test_image_only_inference_uses_the_keyword_predictor(tiny_run):
    config = tiny_run.config
    method = get_method(config)
    batch = _batch(config, method)
    variables = weights.run_variables(method, tiny_run.workdir, batch)
    model = method.model

    b = batch["image"].shape[0]
    twice = {k: jnp.concatenate([v, v]) for k, v in batch.items()}
    twice["ap_ids"] = twice["ap_ids"].at[b:].set(0)  # a garbage report for the second copy

    @jax.jit
    def embeddings(variables, twice):
        predicted = method.embed_images(variables, twice)  # eval_image_keywords='predicted'
        logits = model.apply(variables, batch["image"], method=McplModel.keyword_logits)
        ids, mask = model.ap_tokens.sequences(jax.nn.sigmoid(logits) > 0.5)
        ids = jnp.concatenate([ids, batch["ap_ids"]])  # predicted words; the report's words
        mask = jnp.concatenate([mask, batch["ap_mask"]])
        z, _ = model.apply(variables, twice["image"], ids, mask, method=McplModel.embed_images)
        return predicted, z

    predicted, z = embeddings(variables, twice)
    np.testing.assert_allclose(predicted[b:], predicted[:b], rtol=1e-5, atol=1e-6)  # no report
    np.testing.assert_allclose(z[:b], predicted[:b], rtol=1e-5, atol=1e-6)  # = predicted words
    assert not np.allclose(z[b:], predicted[:b])  # the keywords do reach the image side


MCPL_PARAMS = {
    "backbone",
    "text_prompts",
    "image_prompts",
    "gpcm_1",
    "ap_shared",
    "text_update_1",
    "image_update_1",
    "text_relation_1",
    "image_relation_1",
    "ap_to_image",
    "ap_posemb",
    "keywords",
}
VARIANT_PARAMS = {
    "backbone": {"backbone"},
    "coop": {"backbone", "text_prompts"},
    "maple": {"backbone", "text_prompts", "coupling_0", "coupling_1"},
    "mcpl_splice": MCPL_PARAMS,
    "mcpl_qk_v": MCPL_PARAMS,
}


def _abstract_batch(config):
    b, s, t, length = 2, config.data.image_size, config.data.max_text_len, config.model.ap_max_len
    spec = jax.ShapeDtypeStruct
    return {
        "image": spec((b, s, s, 3), jnp.float32),
        "input_ids": spec((b, t), jnp.int32),
        "attention_mask": spec((b, t), jnp.int32),
        "ap_ids": spec((b, 2, length), jnp.int32),
        "ap_mask": spec((b, 2, length), jnp.int32),
    }


def test_ablation_variants_of_the_benchmark():
    base = tiny_config()
    names = []
    for spec in base.bench.variants:
        name, _, overrides = spec.partition(":")
        names.append(name)
        config = apply_overrides(base, [o for o in overrides.split(";") if o])
        method = get_method(config)
        params = jax.eval_shape(method.init, jax.random.PRNGKey(0), _abstract_batch(config))
        params = params["params"]
        assert set(params) == VARIANT_PARAMS[name], name
        trainable = optim.trainable_mask(
            optim.group_rules(config.optim, method.group_rules()), params
        )
        assert not any(jax.tree.leaves(trainable["backbone"]))
        assert all(jax.tree.leaves({k: v for k, v in trainable.items() if k != "backbone"}))
        if name == "coop":  # text context at layer 0 only
            assert params["text_prompts"].value.shape == (
                1,
                2,
                config.prerequisites.backbone.model.text.width,
            )
    assert names == list(VARIANT_PARAMS)


def test_maple_variant_loss(tiny_run):
    """The MaPLe-style baseline (coupled deep prompts, no AP, splice) trains on a batch."""
    spec = next(s for s in tiny_run.config.bench.variants if s.startswith("maple:"))
    config = apply_overrides(tiny_run.config, spec.partition(":")[2].split(";"))
    method = get_method(config)
    batch = _batch(config, method)
    variables = random_variables(method.model, *_model_inputs(batch), std=0.05)
    loss, metrics, _ = jax.jit(method.loss, static_argnums=3)(variables, batch, None, True)
    assert np.isfinite(float(loss))
    assert "loss_relation" not in metrics and "keyword_bce" not in metrics


def _model_inputs(batch):
    keys = ("image", "input_ids", "attention_mask", "ap_ids", "ap_mask")
    return tuple(batch.get(k) for k in keys)


def test_qk_v_needs_the_ap_prompt():
    with pytest.raises(ValueError, match="ap_prompt"):
        get_method(tiny_config(**{"model.ap_prompt": False}))


def test_hugging_face_clip_folder_as_backbone(tmp_path):
    """A CLIPModel folder: towers from its config.json, CLIP's projections, EOT pooling; with
    no prompts MCPL's embeddings are the CLIP model's."""
    vision = tower_config("vit", "tiny")
    text = tower_config("clip_text", "tiny")
    text.update(vocab_size=30522, max_len=32, eos_token_id=102)  # MiniLM ids; [SEP] ends text
    clip = CLIPModel(build_image_tower(vision), build_text_tower(text))
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = np.array([[101, 2000, 2001, 102] + [0] * 28, [101, 2003, 102] + [0] * 29], np.int32)
    mask = (ids > 0).astype(np.int32)
    clip_vars = random_variables(clip, images, ids, mask, std=0.2)
    folder = export_hf(clip, clip_vars, tmp_path / "clip")

    config = tiny_config(
        **{
            "init.backbone.source": folder,
            "data.tokenizer": default_tokenizer_path(),
            "model.prompt_depth": 0,
        }
    )
    method = get_method(config)
    assert method.spec.kind == "hf_clip" and method.spec.text_pooling == "pooled"
    batch = {"image": images, "input_ids": ids, "attention_mask": mask}
    variables = random_variables(method.model, images, ids, mask)
    loaded, _ = weights.loaded_leaves(
        config.init, weights.flatten(variables), method, weights.run_resolver(config)
    )
    variables = weights.overwrite(variables, loaded)
    ref = jax.jit(clip.apply)(clip_vars, images, ids, mask)
    embed = jax.jit(lambda v, b: (method.embed_images(v, b), method.embed_texts(v, b)))
    z_image, z_text = embed(variables, batch)
    np.testing.assert_allclose(z_image, ref["image"]["pooled"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z_text, ref["text"]["pooled"], rtol=1e-4, atol=1e-5)
    # prompts work on the causal CLIP text tower as well
    prompted = get_method(apply_overrides(config, ["model.prompt_depth=2"]))
    abstract = jax.eval_shape(prompted.init, jax.random.PRNGKey(0), _abstract_batch(config))
    assert set(abstract["params"]) == MCPL_PARAMS


def test_downstream_runner_on_the_prompted_encoder(tiny_run, tmp_path):
    """MCPL's downstream classification (its MLP head on the frozen prompted image encoder)
    is the shared runner's."""
    (tiny_run.workdir / "config.json").write_text(to_json(tiny_run.config))
    overrides = ["downstream.head_hidden=16", "train.num_steps=2"]
    config = runner.build_config("classification:tiny", tiny_run.workdir, 1.0, overrides)
    with contextlib.redirect_stdout(io.StringIO()):
        result = runner.run(config, tmp_path)
    assert 0.0 <= result["eval/synthcxr/auroc"] <= 1.0
    table = (tmp_path / "parameters.txt").read_text()
    assert "head/bn0/scale" in table and "encoder/backbone/" in table
    assert all("frozen" in row for row in table.splitlines() if row.startswith("encoder/"))
