"""MCPL AP keywords: vocabularies, extraction on hand-written reports, token sequences."""

import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax.data.records import Record, missing_labels
from medvlp_jax.data.tokenize import load_tokenizer
from medvlp_jax.methods.mcpl.keywords import (
    ApTokenizer,
    KeywordHook,
    extract_keywords,
    load_vocab,
)

VOCAB = load_vocab()
L = 16


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("")


def _words(hot):
    """(anatomy words, pathology words) selected by a multi-hot, in vocabulary order."""
    chosen = [w for w, h in zip(VOCAB.words, hot, strict=True) if h]
    return [w for w in chosen if w in VOCAB.anatomy], [w for w in chosen if w in VOCAB.pathology]


def test_packaged_vocabulary_is_the_published_one():
    assert (len(VOCAB.anatomy), len(VOCAB.pathology)) == (75, 44)
    assert VOCAB.anatomy[:4] == ("pleural", "lung", "pulmonary", "lungs")
    assert VOCAB.pathology[:3] == ("effusion", "pneumothorax", "consolidation")
    # the three entries that can never match a word are kept
    assert {"port-a-cath", "otracheal"} <= set(VOCAB.anatomy) and "heiaphragm" in VOCAB.pathology


@pytest.mark.parametrize(
    "report, anatomy, pathology",
    [
        # vocabulary order, not report order; repeats counted once; case-insensitive
        (
            "The HEART is enlarged. Small right pleural effusion. Pleural effusion again.",
            ["pleural", "heart"],
            ["effusion"],
        ),
        # whole words only: 'effusions' is its own entry, 'pleurally' and 'hearts' match nothing
        ("Bilateral effusions, pleurally based. Hearts.", [], ["effusions"]),
        # hyphens split words ('lung-base' -> lung); 'port-a-cath' can never match
        ("Lung-base opacity near the port-a-cath.", ["lung"], ["opacity"]),
        ("No acute cardiopulmonary process.", [], []),
    ],
)
def test_extraction_on_hand_written_reports(report, anatomy, pathology):
    hot = extract_keywords(report, VOCAB)
    assert hot.dtype == np.float32 and hot.shape == (119,)
    assert _words(hot) == (anatomy, pathology)


def test_sequences_equal_tokenising_the_joined_words(tokenizer):
    tokens = ApTokenizer.create(tokenizer, VOCAB, L)
    reports = [
        "The heart is enlarged. Right pleural effusion and left lower lobe atelectasis.",
        "Normal study.",
    ]
    hots = [extract_keywords(r, VOCAB) for r in reports] + [np.ones(119, np.float32)]
    for hot in hots:  # the all-ones row also checks truncation to L
        ids, mask = tokens.sequences_np(hot)
        for row, words in enumerate(_words(hot)):
            ref = tokenizer(" ".join(words), max_length=L, padding="max_length", truncation=True)
            np.testing.assert_array_equal(ids[row], ref["input_ids"])
            np.testing.assert_array_equal(mask[row], ref["attention_mask"])


def test_jit_sequences_match_host_sequences(tokenizer):
    tokens = ApTokenizer.create(tokenizer, VOCAB, L)
    rng = np.random.default_rng(0)
    hot = (rng.random((6, 119)) < 0.05).astype(np.float32)
    hot[0], hot[1] = 0, 1  # nothing selected; everything selected (truncated)
    ids, mask = jax.jit(tokens.sequences)(jnp.asarray(hot))
    for b in range(len(hot)):
        ref_ids, ref_mask = tokens.sequences_np(hot[b])
        np.testing.assert_array_equal(np.asarray(ids[b]), ref_ids)
        np.testing.assert_array_equal(np.asarray(mask[b]), ref_mask)


def test_hook_fields_and_pickling(tokenizer):
    hook = KeywordHook(VOCAB, ApTokenizer.create(tokenizer, VOCAB, L))
    record = Record("x.png", "Left pneumothorax. The lungs are clear.", missing_labels())
    out = pickle.loads(pickle.dumps(hook))(record)
    assert out["ap_ids"].shape == out["ap_mask"].shape == (2, L)
    assert out["ap_ids"].dtype == out["ap_mask"].dtype == np.int32
    assert _words(out["ap_labels"]) == (["lungs"], ["pneumothorax"])
    lungs = tokenizer("lungs", add_special_tokens=False)["input_ids"]
    assert list(out["ap_ids"][0, 1 : 1 + len(lungs)]) == lungs


def test_custom_vocabulary_file_and_errors(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"anatomy": ["Heart", "lung"], "pathology": ["edema"]}))
    vocab = load_vocab(str(path))
    assert vocab.words == ("heart", "lung", "edema")
    path.write_text(json.dumps({"anatomy": ["heart"], "pathology": []}))
    with pytest.raises(ValueError, match=r"vocab\.json.*'pathology'"):
        load_vocab(str(path))
