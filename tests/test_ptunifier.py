"""PTUnifier: prompt selection, MLM masking, ITM pairing, the losses against torch
re-derivations, the stacked pre-training pass against the single-input paths, the
:original preset, and the main command end to end (train, evaluate, resume).

The co-attention fusion block itself is checked against numpy in test_models_blocks.py.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tinyconfigs
import torch
import torch.nn.functional as F

from medvlp_jax import config as config_lib
from medvlp_jax import optim, train, weights
from medvlp_jax.data import tokenize
from medvlp_jax.losses.contrastive import clip_loss
from medvlp_jax.losses.matching import itm_loss, itm_pairs
from medvlp_jax.losses.mlm import mask_tokens, mlm_loss
from medvlp_jax.methods.base import SetupContext, get_method
from medvlp_jax.methods.ptunifier.model import PTUnifierModel
from medvlp_jax.models.builders import build_image_tower
from medvlp_jax.models.convert import export_hf
from medvlp_jax.models.prompt_pool import select_prompts
from medvlp_jax.models.testing import random_variables
from medvlp_jax.parallel import mesh as mesh_lib

ROOT = tinyconfigs.ROOT


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ------------------------------------------------------------------ prompt pools


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_selection_equals_numpy_top_k(similarity):
    query = _rand(5, 8)
    pool = (_rand(40, 8, seed=1) * np.linspace(0.1, 3, 40)[:, None]).astype(np.float32)
    rows, idx = select_prompts(jnp.asarray(query), jnp.asarray(pool), 6, similarity)
    q, p = query, pool
    if similarity == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
    expected = np.argsort(-(q @ p.T), axis=1)[:, :6]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(rows, pool[expected])
    if similarity == "dot":  # the scaled rows make the two similarities choose differently
        _, cos_idx = select_prompts(jnp.asarray(query), jnp.asarray(pool), 6, "cosine")
        assert not np.array_equal(cos_idx, idx)
    with pytest.raises(ValueError, match="k=41 prompts from a pool of 40"):
        select_prompts(jnp.asarray(query), jnp.asarray(pool), 41)


def test_gradient_reaches_the_selected_rows_only():
    query, pool, weights = _rand(3, 8), _rand(30, 8, seed=1), _rand(3, 4, 8, seed=2)

    def f(pool, query):
        rows, _ = select_prompts(query, pool, 4)
        return jnp.sum(rows * weights)

    g_pool, g_query = jax.grad(f, argnums=(0, 1))(jnp.asarray(pool), jnp.asarray(query))
    _, idx = select_prompts(jnp.asarray(query), jnp.asarray(pool), 4)
    expected = np.zeros_like(pool)
    np.add.at(expected, np.asarray(idx).ravel(), weights.reshape(-1, 8))
    np.testing.assert_allclose(g_pool, expected, rtol=1e-6)
    unselected = np.setdiff1d(np.arange(30), np.asarray(idx))
    assert unselected.size and not np.any(np.asarray(g_pool)[unselected])
    np.testing.assert_array_equal(g_query, 0.0)  # the choice itself has no gradient


# ------------------------------------------------------------------ MLM masking, ITM pairs


def test_mlm_masking_statistics():
    ids = np.random.default_rng(0).integers(1000, 2000, size=(400, 50)).astype(np.int32)
    candidates = np.random.default_rng(1).random(ids.shape) < 0.7
    counts = np.zeros(4)  # not selected, [MASK], random, kept
    draws = []
    for seed in range(5):
        masked, selected = mask_tokens(
            jax.random.key(seed),
            jnp.asarray(ids),
            jnp.asarray(candidates),
            mask_token_id=103,
            vocab_size=30522,
        )
        masked, selected = np.asarray(masked), np.asarray(selected)
        draws.append(selected)
        assert not np.any(selected & ~candidates)
        np.testing.assert_array_equal(masked[~selected], ids[~selected])
        sel_masked, sel_ids = masked[selected], ids[selected]
        counts += [
            candidates.sum() - selected.sum(),
            np.sum(sel_masked == 103),
            np.sum((sel_masked != 103) & (sel_masked != sel_ids)),
            np.sum(sel_masked == sel_ids),
        ]
    n_sel = counts[1:].sum()
    assert abs(n_sel / (counts.sum()) - 0.15) < 0.005  # 70k candidates: sd 0.0013
    fractions = counts[1:] / n_sel
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.01)  # sd <= 0.004
    # Each step's key draws its own mask.
    assert not np.array_equal(draws[0], draws[1])


@pytest.mark.parametrize("batch", [7, 16])
def test_itm_pairs_are_balanced(batch):
    for seed in range(20):
        index, labels = map(np.asarray, itm_pairs(jax.random.key(seed), batch))
        assert labels.sum() == batch // 2
        rows = np.arange(batch)
        np.testing.assert_array_equal(index[labels == 1], rows[labels == 1])
        assert np.all(index[labels == 0] != rows[labels == 0])
        assert np.all((index >= 0) & (index < batch))


def test_itm_hard_negatives_follow_the_similarities():
    batch = 8
    sim = np.full((batch, batch), -50.0, np.float32)
    hardest = (np.arange(batch) + 3) % batch
    sim[np.arange(batch), hardest] = 50.0
    np.fill_diagonal(sim, 100.0)  # the positive itself is never drawn as a negative
    index, labels = map(np.asarray, itm_pairs(jax.random.key(0), batch, jnp.asarray(sim)))
    negatives = labels == 0
    np.testing.assert_array_equal(index[negatives], hardest[negatives])


# ------------------------------------------------------------------ losses vs torch


def test_losses_match_torch_value_and_gradient():
    b, t, v, h = 6, 9, 50, 12
    logits, labels = _rand(b, t, v), np.random.default_rng(3).integers(0, v, (b, t))
    selected = np.random.default_rng(4).random((b, t)) < 0.3
    itm_logits, itm_labels = _rand(b, 2, seed=5), np.array([1, 0, 1, 0, 1, 0])
    zi, zt = _rand(b, h, seed=6), _rand(b, h, seed=7)
    w = (1.0, 0.5, 0.1)

    def ours(logits, itm_logits, zi, zt):
        mlm, _ = mlm_loss(logits, jnp.asarray(labels), jnp.asarray(selected))
        itm, _ = itm_loss(itm_logits, jnp.asarray(itm_labels))
        itc, _ = clip_loss(zi, zt, 1.0 / 0.1)
        return w[0] * mlm + w[1] * itm + w[2] * itc

    value, grads = jax.value_and_grad(ours, argnums=(0, 1, 2, 3))(
        *map(jnp.asarray, (logits, itm_logits, zi, zt))
    )
    tl, ti, tzi, tzt = (torch.tensor(x, requires_grad=True) for x in (logits, itm_logits, zi, zt))
    target = torch.tensor(np.where(selected, labels, -100))
    mlm = F.cross_entropy(tl.reshape(-1, v), target.reshape(-1), ignore_index=-100)
    itm = F.cross_entropy(ti, torch.tensor(itm_labels))
    ni, nt = F.normalize(tzi, dim=-1), F.normalize(tzt, dim=-1)
    sim = ni @ nt.T / 0.1
    arange = torch.arange(b)
    itc = (F.cross_entropy(sim, arange) + F.cross_entropy(sim.T, arange)) / 2
    ref = w[0] * mlm + w[1] * itm + w[2] * itc
    ref.backward()
    np.testing.assert_allclose(value, ref.item(), rtol=1e-5)
    for ours_g, ref_t in zip(grads, (tl, ti, tzi, tzt)):
        np.testing.assert_allclose(ours_g, ref_t.grad.numpy(), atol=1e-6)


# ------------------------------------------------------------------ the model


def _method(*overrides):
    config = tinyconfigs.tiny("ptunifier", *overrides)
    method = get_method(config)

    class Ctx:
        tokenizer = tokenize.load_tokenizer("")

    method.setup(Ctx)
    return config, method


def _batch(b=6, t=12, size=32, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 5000, (b, t)).astype(np.int32)
    lengths = rng.integers(4, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = 101
    ids[np.arange(b), lengths - 1] = 102
    ids = np.where(mask, ids, 0)
    image = rng.normal(size=(b, size, size, 3)).astype(np.float32)
    return {
        "image": jnp.asarray(image),
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(mask),
    }


@pytest.mark.parametrize("prompts", ["7,12", "0,0"])
def test_stacked_pretraining_pass_equals_the_single_input_paths(prompts):
    """The training pass runs each tower once on padded, stacked inputs; its ITC and ITM
    outputs equal the evaluators' one-input-at-a-time paths (here the visual prompts are
    shorter than the 16 patches and the 12 textual prompts + 2 longer than the 12 tokens, so
    padding and masks are exercised both ways)."""
    k_visual, k_text = prompts.split(",")
    pool = "0" if k_visual == "0" else "16"
    _, method = _method(
        f"model.pool_size={pool}",
        f"model.num_visual_prompts={k_visual}",
        f"model.num_text_prompts={k_text}",
    )
    batch = _batch()
    variables = method.init(jax.random.key(0), batch)

    @jax.jit
    def both(variables, batch):
        stacked = method.model.apply(
            variables,
            batch["image"],
            batch["input_ids"],
            batch["input_ids"],
            batch["attention_mask"],
            jax.random.key(1),
            method=PTUnifierModel.pretrain,
        )
        single = {
            "itc_image": method.embed_images(variables, batch),
            "itc_text": method.embed_texts(variables, batch),
            "pair": method.pair_scores(variables, batch),
        }
        return stacked, single

    out, single = both(variables, batch)
    assert out["mlm_logits"].shape == (*batch["input_ids"].shape, 30522)
    np.testing.assert_allclose(out["itc_image"], single["itc_image"], atol=2e-5)
    np.testing.assert_allclose(out["itc_text"], single["itc_text"], atol=2e-5)
    logits = np.asarray(out["itm_logits"])
    pos = np.asarray(out["itm_labels"]) == 1
    np.testing.assert_allclose((logits[:, 1] - logits[:, 0])[pos], single["pair"][pos], atol=2e-5)


def test_config_errors_name_the_field():
    with pytest.raises(
        ValueError, match=r"model\.image\.width \(32\) must equal model\.text\.width"
    ):
        get_method(tinyconfigs.tiny("ptunifier", "model.text.width=64"))
    with pytest.raises(ValueError, match=r"num_visual_prompts=20"):
        get_method(tinyconfigs.tiny("ptunifier", "model.num_visual_prompts=20"))
    with pytest.raises(ValueError, match=r"model\.visual_pool_size=-2"):
        get_method(tinyconfigs.tiny("ptunifier", "model.visual_pool_size=-2"))


def test_frozen_pools_and_lr_multipliers_in_the_group_table():
    """Released: x5 lr on the heads, the fusion module and the pools; `freeze_pools` first.
    (test_methods_registry trains with frozen pools and checks them bit-identical.)"""
    config, method = _method("model.freeze_pools=true")
    params = method.init(jax.random.key(0), _batch())["params"]
    rules = optim.group_rules(config.optim, method.group_rules())
    groups = dict(
        zip(
            jax.tree.leaves(optim.param_paths(params)),
            jax.tree.leaves(optim.param_groups(rules, params)),
            strict=True,
        )
    )
    assert groups["visual_pool"].frozen and groups["text_pool"].frozen
    boosted = {p for p, g in groups.items() if not g.frozen and g.lr == 5.0}
    for path in (
        "fusion/layer_0/x_layer/attn/query/kernel",
        "mlm_head/bias",
        "itm_head/kernel",
        "fusion_text_proj/kernel",
        "fusion_image_pooler/bias",
        "itc_head/image_proj/kernel",
    ):
        assert path in boosted, path
    assert all(p.split("/")[0] not in ("image", "text", "modality_embed") for p in boosted)
    assert sum(not g.frozen and g.lr == 1.0 for g in groups.values()) > 10


def test_drop_last_image_block_imports_all_but_the_last(tmp_path):
    config = tinyconfigs.tiny(
        "ptunifier", "model.drop_last_image_block=true", "model.image.num_layers=3"
    )
    tower = build_image_tower(config.model.image)
    variables = random_variables(tower, *tower.example_inputs(1))
    folder = export_hf(tower, variables, tmp_path / "vit")
    imported = get_method(config).importers()["image"](str(folder))["params"]
    full = jax.tree.map(np.asarray, variables["params"])
    last = f"layer_{config.model.image.num_layers - 1}"
    assert last in full["encoder"] and last not in imported["encoder"]
    full["encoder"].pop(last)
    jax.tree.map(np.testing.assert_array_equal, imported, full)


def _param_shapes(config) -> dict:
    """config's model variables as flat '/'-joined ShapeDtypeStructs (traced, not built)."""
    method = get_method(config)
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    mesh = mesh_lib.make_mesh(config.mesh)
    method.setup(SetupContext(config, Path("unused"), mesh, tokenizer, []))
    size, t = config.data.image_size, config.data.max_text_len
    example = {
        "image": jax.ShapeDtypeStruct((2, size, size, config.data.channels), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((2, t), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((2, t), jnp.int32),
    }
    shapes = jax.eval_shape(method.init, jax.random.key(0), example)
    return weights.flatten(nn.meta.unbox(shapes))


def test_image_tower_loads_whole_from_the_backbone_run():
    """The default and :original image loads take every image-tower leaf (params and batch
    statistics) of the CLIP backbone run and skip its text tower, strictly; :original leaves
    out the last ViT block."""
    default = config_lib.load_config_file(str(ROOT / "configs/ptunifier.py"))
    source = jax.tree.map(  # zero-size-in-memory stand-ins for the run's arrays
        lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape),
        _param_shapes(default.prerequisites.backbone),
    )
    assert any(p.startswith("text/") for p in source["params"])  # to be skipped
    target = _param_shapes(default)  # :original's model is one block shorter
    for preset in ("", "original"):
        config = config_lib.load_config_file(str(ROOT / f"configs/ptunifier.py:{preset}"))
        assert config.prerequisites.backbone == default.prerequisites.backbone
        last = f"image/encoder/layer_{config.model.image.num_layers - 1}/"
        if preset == "original":
            target = {
                c: {p: v for p, v in t.items() if not p.startswith(last)} for c, t in target.items()
            }
        loaded, missing, unexpected = weights.plan("image", config.init.image, source, target)
        assert missing == [] and unexpected == [], preset
        for collection, leaves in target.items():
            image = {p for p in leaves if p.startswith("image/")}
            assert set(loaded.get(collection, {})) == image, (preset, collection)
        assert any(p.startswith(last) for p in loaded["params"]) == (preset == ""), preset


def test_original_preset_changes_what_it_documents():
    default = config_lib.load_config_file(str(ROOT / "configs/ptunifier.py"))
    original = config_lib.load_config_file(str(ROOT / "configs/ptunifier.py:original"))
    paths = list(config_lib.leaf_paths(default))
    assert paths == list(config_lib.leaf_paths(original))
    changed = {p for p in paths if config_lib.lookup(default, p) != config_lib.lookup(original, p)}
    assert changed == {
        "model.drop_last_image_block",
        "model.freeze_pools",
        "model.mlm_mask_padding",
        "model.itc_enabled",
        "optim.b2",
        "optim.weight_decay",
        "optim.schedule",
        "optim.warmup_steps",
        "optim.clip_grad_norm",
        "init.image.map",  # the last block's rows skipped
        "data.train_text",
    }


# ------------------------------------------------------------------ end to end


def test_main_trains_and_evaluates_every_path(tmp_path):
    """3 steps of the tiny config, then every evaluator: retrieval with ITM re-ranking,
    zero-shot, the image-only and the text-only probes. (Resuming, and frozen pools kept
    bit-identical, are test_methods_registry's, for every method.)"""
    config = tinyconfigs.tiny(
        "ptunifier",
        "train.num_steps=3",
        "train.log_every=3",
        "train.checkpoint_every=3",
        "evals.zero_shot.enabled=true",
        "evals.retrieval.enabled=true",
        "evals.linear_probe.enabled=true",
        "evals.text_probe.enabled=true",
        f"data.cache_dir={tmp_path}/c",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = train.run(config, tmp_path / "run")
    assert (tmp_path / "run/checkpoints/3").is_dir()
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    (row,) = [r for r in map(json.loads, lines) if "train/loss" in r]
    for key in ("mlm_loss", "itm_loss", "itc_loss", "mlm_acc", "itm_acc", "mlm_tokens"):
        assert np.isfinite(row[f"train/{key}"]), key
    weighted = row["train/mlm_loss"] + 0.5 * row["train/itm_loss"] + 0.1 * row["train/itc_loss"]
    np.testing.assert_allclose(row["train/loss"], weighted, rtol=1e-5)
    for key in (
        "i2t_R@10",
        "t2i_R@1",
        "zero_shot_acc",
        "linear_probe_auroc@1",
        "text_probe/linear_probe_auroc@1",
    ):
        assert 0.0 <= metrics[f"eval/synthcxr/{key}"] <= 1.0, key
