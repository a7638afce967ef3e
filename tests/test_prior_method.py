"""PRIOR as a method: sentence indices from the data hook, the `:original` switches (each
changes what it claims; the preset changes nothing else), config errors, and the three-stage
tiny run stopped at a stage boundary, resumed, and evaluated with PRIOR's zero-shot score."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tinyconfigs import ROOT, tiny

from medvlp_jax import config as config_lib
from medvlp_jax import train
from medvlp_jax.data import tokenize
from medvlp_jax.data.records import Record, missing_labels
from medvlp_jax.data.reports import split_sentences
from medvlp_jax.methods.base import get_method
from medvlp_jax.methods.prior import method as prior
from medvlp_jax.methods.prior.model import local_tokens, token_map
from medvlp_jax.methods.prior.reconstruction import SlotDecoder
from medvlp_jax.methods.prior.sentences import SentenceHook
from medvlp_jax.models.transformer import TransformerConfig
from medvlp_jax.parallel.sharding import strip_boxes

TEXTS = (
    "Heart size is normal. No pleural effusion!  Lungs are clear?",
    "Mild cardiomegaly.",
    "",
    "One. Two. Three. Four. Five.",
)


def _record(text: str) -> Record:
    return Record(image_path="", text=text, labels=missing_labels())


def test_sentence_ids_line_up_with_the_pipeline_tokens():
    tok = tokenize.load_tokenizer("")
    hook = SentenceHook(tok, max_len=32, max_sentences=3)
    ids, mask = tokenize.tokenize(tok, TEXTS, 32)
    assert split_sentences(TEXTS[0]) == [
        "Heart size is normal.",
        "No pleural effusion!",
        "Lungs are clear?",
    ]
    for text, row_ids, row_mask in zip(TEXTS, ids, mask):
        sid = hook(_record(text))["sentence_ids"]
        assert sid.shape == (32,) and sid.dtype == np.int32
        words = [tok.decode([int(i)]) for i, s in zip(row_ids, sid) if s >= 0]
        if text:
            # special and padding tokens carry -1; each sentence's tokens are its words
            assert sid[0] == -1 and np.all(sid[row_mask == 0] == -1)
            for k, sentence in enumerate(split_sentences(text)[:3]):
                got = tok.decode([int(i) for i, s in zip(row_ids, sid) if s == k])
                assert got.replace(" ", "") == sentence.lower().replace(" ", "")
        else:  # an empty report: its special tokens are its one sentence
            assert words == ["[CLS]", "[SEP]"] and set(sid[row_mask == 1]) == {0}
    # sentences past max_sentences are dropped
    assert set(hook(_record(TEXTS[3]))["sentence_ids"]) == {-1, 0, 1, 2}


def test_original_preset_flips_exactly_the_documented_switches():
    default = config_lib.load_config_file(str(ROOT / "configs/prior.py:tiny"))
    original = config_lib.load_config_file(str(ROOT / "configs/prior.py:tiny,original"))
    a, b = (_leaves(c) for c in (default, original))
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {f"model.{k}" for k in prior_original_flags()}
    for key in changed:
        assert b[key] != prior.default_model_config()[key.split(".")[1]]


def prior_original_flags() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("prior_config", ROOT / "configs/prior.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ORIGINAL


def _leaves(config) -> dict:
    return {p: config_lib.lookup(config, p) for p in config_lib.leaf_paths(config)}


def test_nchw_local_tokens_scramble_positions_and_token_map_inverts_both():
    fmap = jnp.arange(2 * 2 * 3 * 4.0).reshape(2, 2, 3, 4)
    ours = local_tokens(fmap, nchw_order=False)
    np.testing.assert_array_equal(ours[1, 4], fmap[1, 1, 1])  # region (1, 1) of a 2 x 3 grid
    released = local_tokens(fmap, nchw_order=True)
    np.testing.assert_array_equal(
        released.reshape(-1), jnp.transpose(fmap, (0, 3, 1, 2)).reshape(-1)
    )
    assert not np.array_equal(ours, released)
    for nchw in (False, True):
        np.testing.assert_array_equal(token_map(local_tokens(fmap, nchw), (2, 3), nchw), fmap)


def test_causal_decoder_hides_later_queries():
    cfg = TransformerConfig(width=8, num_layers=1, num_heads=2, mlp_dim=16, norm_first=False)
    context = jnp.ones((1, 3, 8))
    for causal in (False, True):
        dec = SlotDecoder(cfg, num_queries=4, causal=causal)
        params = strip_boxes(dec.init(jax.random.PRNGKey(0), context, train=False))
        queries = params["params"]["queries"]
        moved = {"params": {**params["params"], "queries": queries.at[3].add(jnp.arange(8.0))}}
        a, b = (dec.apply(p, context, train=False) for p in (params, moved))
        first_same = np.allclose(a[0, :3], b[0, :3])
        assert first_same == causal  # only a causal decoder keeps slots 0-2 blind to query 3
        assert not np.allclose(a[0, 3], b[0, 3])


def test_scale_clamp_and_bad_values_name_the_field():
    config = tiny("prior")
    method = get_method(config)
    assert float(method._scale(jnp.log(400.0))) == pytest.approx(100.0)
    released = get_method(config_lib.apply_overrides(config, ["model.clamp_logit_scale=false"]))
    assert float(released._scale(jnp.log(400.0))) == pytest.approx(400.0)
    for override, field in (
        ("model.image.name=clip_text", "config.model.image.name"),
        ("model.num_queries=4", "config.model.max_sentences=8 > num_queries=4"),
        ("model.image_dropout=1.0", "config.model.image_dropout"),
        ("data.image_size=36", "config.data.image_size=36"),
    ):
        bad = config_lib.apply_overrides(config, [override, "model.prototypes=true"])
        bad.model.reconstruction = True
        with pytest.raises(ValueError, match=field.replace("[", r"\[")):
            get_method(bad)


def _tiny_batch(method, tok, config):
    texts = [TEXTS[i % len(TEXTS)] for i in range(8)]
    ids, mask = tokenize.tokenize(tok, texts, config.data.max_text_len)
    hook = method.data_hooks(tok)[0]
    size = config.data.image_size
    return {
        "image": np.random.default_rng(0).normal(size=(8, size, size, 1)).astype(np.float32),
        "input_ids": ids,
        "attention_mask": mask,
        "sentence_ids": np.stack([hook(_record(t))["sentence_ids"] for t in texts]),
    }


def test_loss_ignores_padding_tokens_and_eval_gumbel_is_a_switch():
    tok = tokenize.load_tokenizer("")
    config = tiny("prior", "model.prototypes=true")
    method = get_method(config)
    batch = _tiny_batch(method, tok, config)
    variables = strip_boxes(method.init(jax.random.PRNGKey(0), batch))
    loss = jax.jit(lambda v, b: method.loss(v, b, jax.random.PRNGKey(1), True)[:2])
    value, metrics = loss(variables, batch)
    assert "proto_loss" in metrics and "spg_loss" not in metrics
    assert np.isfinite(float(value))
    # Garbage in the padding tokens (masked out of attention, sentence -1) changes nothing.
    garbage = dict(batch, input_ids=np.where(batch["attention_mask"] == 1, batch["input_ids"], 7))
    np.testing.assert_allclose(float(loss(variables, garbage)[0]), float(value), rtol=1e-6)

    # Evaluation: deterministic bank by default; the released code samples Gumbel noise.
    embed = jax.jit(method.embed_texts)
    np.testing.assert_array_equal(embed(variables, batch), embed(variables, batch))
    released = get_method(config_lib.apply_overrides(config, ["model.gumbel_at_eval=true"]))
    assert not np.allclose(embed(variables, batch), jax.jit(released.embed_texts)(variables, batch))


def test_three_stages_stop_at_the_boundary_resume_and_evaluate(tmp_path, monkeypatch):
    config = tiny(
        "prior", "evals.zero_shot.enabled=true", "train.checkpoint_every=100", "train.log_every=1"
    )
    monkeypatch.setattr(train._StopFlag, "should_stop", lambda self, s: s == 2)
    train.run(config, tmp_path)
    monkeypatch.undo()
    train.run(config, tmp_path)

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = {m["step"]: m for m in lines if "train/loss" in m}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    recon = ("train/image_recon_loss", "train/spg_loss", "train/kl_loss", "train/gpa_loss")
    for step, m in steps.items():
        assert np.isfinite(m["train/loss"]) and "train/local_text_loss" in m
        assert ("train/proto_loss" in m) == (step > 2)
        assert all((k in m) == (step > 4) for k in recon)
    final = [m for m in lines if "eval/synthcxr/zero_shot_acc" in m]
    assert final and final[-1]["step"] == 6
