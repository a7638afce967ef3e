"""The frozen-LM [CLS] cache: miss -> hit, invalidation by texts / tokenizer / weights, the
stored rows against the LM run text by text, and the data hook (lookup, misses, pickling)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import jax
import numpy as np

from medvlp_jax import config as config_lib
from medvlp_jax import embedding_cache
from medvlp_jax.data.records import Record
from medvlp_jax.data.tokenize import load_tokenizer, tokenize
from medvlp_jax.methods.base import SetupContext, get_method
from medvlp_jax.parallel.mesh import MESH_AXES

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "No acute cardiopulmonary process.",
    "Small left pleural effusion.",
    "Moderate cardiomegaly with mild pulmonary edema.",
    "No acute cardiopulmonary process.",  # a repeat: embedded once
    "Right lower lobe consolidation concerning for pneumonia.",
    "Bibasilar atelectasis.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "Stable mediastinal contours; no pneumothorax.",
    "Large right pleural effusion with compressive atelectasis.",
    "Interval improvement of the left basilar opacity.",
    "Heart size is normal. Lungs are clear.",
]


def records(texts):
    nan = np.full(14, np.nan, np.float32)
    return [Record(f"img{i}.png", t, nan, str(i), str(i), "PA") for i, t in enumerate(texts)]


def test_cache_hit_miss_invalidation_and_lookup(tmp_path):
    config = config_lib.load_config_file(str(ROOT / "configs/mflag.py:tiny"))
    config = config_lib.apply_overrides(
        config, [f"model.text_cache_dir={tmp_path}", "model.text_cache_batch_size=8"]
    )
    mesh = jax.make_mesh((4, 2, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    tokenizer = load_tokenizer("")
    method = get_method(config)

    def setup(texts, tok=tokenizer):
        method.setup(SetupContext(config, tmp_path, mesh, tok, records(texts)))
        return method.cache_hit, Path(method.lookup.folder)

    hit, first = setup(TEXTS)
    assert not hit and first.parent == tmp_path
    assert setup(list(reversed(TEXTS))) == (True, first)  # same texts, any order: reused

    # The stored rows are the frozen LM's [CLS], run here one text at a time.
    lookup = method.lookup
    params = method._frozen_text_params()
    ids, mask = tokenize(tokenizer, TEXTS, config.data.max_text_len)
    one = jax.jit(method.text_cls)
    expected = np.stack(
        [one({"params": params}, ids[i : i + 1], mask[i : i + 1])[0] for i in range(11)]
    )
    got, found = lookup.lookup(TEXTS)
    assert found.all() and lookup.dim == config.model.text.width
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(np.load(first / "embeddings.npy")) == 10  # the repeat is stored once
    assert np.array_equal(method.data_hooks(tokenizer)[0](records(TEXTS)[2])["text_cls"], got[2])
    # Texts outside the entry (prompts, test reports) get zeros; the hook survives pickling.
    clone = pickle.loads(pickle.dumps(lookup))
    missing, found = clone.lookup(["an unseen report", TEXTS[5]])
    assert found.tolist() == [False, True]
    assert np.all(missing[0] == 0) and np.array_equal(missing[1], got[5])

    # A changed text, tokenizer or LM weights: a new entry, recomputed.
    changed = [*TEXTS[:-1], "Heart size is normal. Lungs are clear bilaterally."]
    hit, other = setup(changed)
    assert not hit and other != first
    np.testing.assert_array_equal(method.lookup.lookup(TEXTS[:5])[0], got[:5])
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["pneumoxyz"])
    hit, by_tokenizer = setup(TEXTS, extended)
    assert not hit and by_tokenizer not in (first, other)
    method.config.seed = 1  # the from-scratch LM's weights come from the (resolved) seed
    hit, by_weights = setup(TEXTS)
    assert not hit and by_weights not in (first, other, by_tokenizer)
    assert not np.allclose(method.lookup.lookup(TEXTS)[0], got)
    method.config.seed = 0
    assert setup(TEXTS) == (True, first)


def test_cache_key_covers_each_input_and_ignores_order_and_repeats():
    tokenizer = load_tokenizer("")
    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    base = dict(tower_config={"width": 3}, params=params, tokenizer=tokenizer, max_len=8)
    key, parts = embedding_cache.cache_key(**base, texts=["x", "y"])
    assert embedding_cache.cache_key(**base, texts=["y", "x", "y"])[0] == key
    bumped = {"a": params["a"].copy()}
    bumped["a"][1, 2] = np.nextafter(np.float32(5), np.float32(6))
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["pneumoxyz"])
    variants = [
        dict(base, tower_config={"width": 3, "dtype": "bfloat16"}),
        dict(base, params=bumped),
        dict(base, tokenizer=extended),
        dict(base, max_len=9),
    ]
    keys = {embedding_cache.cache_key(**v, texts=["x", "y"])[0] for v in variants}
    keys.add(embedding_cache.cache_key(**base, texts=["x", "y!"])[0])
    assert len(keys) == 5 and key not in keys
    assert set(parts) == {"format", "tower", "weights", "tokenizer", "max_len", "texts"}
