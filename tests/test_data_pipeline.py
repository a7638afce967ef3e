"""Grain pipelines: batch contents, determinism, sharding, eval padding, hooks, state restore."""

import dataclasses
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp_jax.config import base_config, check_choices
from medvlp_jax.data.bad_records import BadRecordError
from medvlp_jax.data.config import default_data_config
from medvlp_jax.data.pipeline import eval_batches, train_iterator
from medvlp_jax.data.records import Record
from medvlp_jax.data.reports import split_sentences
from medvlp_jax.data.sources import load_records
from medvlp_jax.data.synthcxr import ensure_synthcxr
from medvlp_jax.data.tokenize import load_tokenizer, tokenize
from medvlp_jax.data.transforms import apply_uncertain_policy

SIZE = 32


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tree = ensure_synthcxr(tmp_path_factory.getbasetemp() / "medvlp-data-cache", 40, 64, 0)
    cfg = default_data_config()
    cfg.source, cfg.root = "mimic", str(tree)
    cfg.image_size, cfg.batch_size, cfg.max_text_len, cfg.prefetch = SIZE, 6, 24, 0
    records = load_records(cfg, "train")
    assert len(records) >= 20
    return cfg, records, load_tokenizer("")


def _cfg(cfg, **overrides):
    cfg = cfg.copy_and_resolve_references()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _flat(batches, key):
    return np.concatenate([b[key] for b in batches])


def test_train_batch_contents(base):
    cfg, records, tok = base
    batch = next(train_iterator(cfg, records, tok, seed=0))
    assert set(batch) == {"image", "input_ids", "attention_mask", "labels", "label_mask", "index"}
    assert batch["image"].shape == (6, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (6, 24)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
    assert batch["labels"].shape == batch["label_mask"].shape == (6, 14)
    assert batch["index"].dtype == np.int32 and len(set(batch["index"])) == 6
    assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # gray repeated
    for row, i in enumerate(batch["index"]):
        ids, mask = tokenize(tok, [records[i].text], 24)
        np.testing.assert_array_equal(batch["input_ids"][row], ids[0])
        np.testing.assert_array_equal(batch["attention_mask"][row], mask[0])
        labels, label_mask = apply_uncertain_policy(records[i].labels, cfg.uncertain_policy)
        np.testing.assert_array_equal(batch["labels"][row], labels)
        np.testing.assert_array_equal(batch["label_mask"][row], label_mask)
    assert tok.unk_token_id not in batch["input_ids"]
    words = tok.convert_ids_to_tokens(batch["input_ids"][0])
    assert words[0] == "[CLS]" and len(set(words)) > 5


def test_eval_image_is_resize_and_normalise(base):
    cfg, records, tok = base
    cfg = _cfg(cfg, channels=1, mean=(0.2,), std=(0.4,))
    batch = next(eval_batches(cfg, records, tok, batch_size=4))
    for row, i in enumerate(batch["index"]):
        with Image.open(records[i].image_path) as img:  # square 64 px
            img.draft("L", (SIZE, SIZE))  # JPEGs are decoded at the smallest DCT scale >= SIZE
            ref = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.float32) / 255
        np.testing.assert_allclose(batch["image"][row, :, :, 0], (ref - 0.2) / 0.4, atol=1e-6)
    assert batch["image"].shape == (4, SIZE, SIZE, 1)


def test_augmentation_switch(base):
    cfg, records, tok = base
    plain = _cfg(cfg)
    plain.augment.enabled = False
    train = next(train_iterator(plain, records, tok, seed=0))
    reference = next(eval_batches(plain, records, tok, batch_size=len(records)))
    np.testing.assert_array_equal(train["image"], reference["image"][train["index"]])
    augmented = next(train_iterator(cfg, records, tok, seed=0))
    np.testing.assert_array_equal(augmented["index"], train["index"])
    assert np.abs(augmented["image"] - train["image"]).mean() > 0.01


def test_random_sentence_draws_one_sentence_per_example_and_epoch(base):
    cfg, records, tok = base
    cfg = _cfg(cfg, train_text="random_sentence", max_text_len=64)
    epochs = 4
    steps = epochs * len(records) // cfg.batch_size
    batches = _take(train_iterator(cfg, records, tok, seed=0), steps)
    again = _take(train_iterator(cfg, records, tok, seed=0), steps)
    np.testing.assert_array_equal(_flat(batches, "input_ids"), _flat(again, "input_ids"))
    drawn: dict[int, set[str]] = {}
    for index, ids in zip(_flat(batches, "index"), _flat(batches, "input_ids"), strict=True):
        sentences = split_sentences(records[index].text)
        encoded = {s: tuple(tokenize(tok, [s], 64)[0][0]) for s in sentences}
        text = next((s for s, e in encoded.items() if e == tuple(ids)), None)
        assert text is not None, (records[index].text, tok.decode(ids))
        drawn.setdefault(int(index), set()).add(text)
    several = [i for i in drawn if len(split_sentences(records[i].text)) > 2]
    assert several and sum(len(drawn[i]) > 1 for i in several) > len(several) // 2
    with pytest.raises(ValueError, match=r"config.data.train_text='sentence'"):
        check_choices(_with_data(_cfg(cfg, train_text="sentence")))


def _with_data(data_cfg):
    config = base_config()
    config.data = data_cfg
    return config


def test_determinism_by_seed(base):
    cfg, records, tok = base
    a = _take(train_iterator(cfg, records, tok, seed=0), 3)
    b = _take(train_iterator(cfg, records, tok, seed=0), 3)
    c = _take(train_iterator(cfg, records, tok, seed=1), 3)
    for key in ("index", "image", "input_ids"):
        np.testing.assert_array_equal(_flat(a, key), _flat(b, key))
    assert not np.array_equal(_flat(a, "index"), _flat(c, "index"))


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_interleave_into_the_global_stream(base, count):
    cfg, records, tok = base
    n = len(records)
    steps = -(-n // 6) + 1  # a bit more than one epoch of the single-process stream
    single = _take(train_iterator(cfg, records, tok, seed=0), steps)
    index, image = _flat(single, "index"), _flat(single, "image")
    assert sorted(index[:n]) == list(range(n))  # each epoch is a permutation of all records
    shards = [
        _take(
            train_iterator(cfg, records, tok, seed=0, process_index=p, process_count=count), steps
        )
        for p in range(count)
    ]
    for p, shard in enumerate(shards):
        assert shard[0]["index"].shape == (6 // count,)
        k = len(_flat(shard, "index"))
        np.testing.assert_array_equal(_flat(shard, "index"), index[p::count][:k])
        np.testing.assert_array_equal(_flat(shard, "image"), image[p::count][:k])
    first_epoch = [
        i for p, s in enumerate(shards) for i in _flat(s, "index")[: len(range(p, n, count))]
    ]
    assert sorted(first_epoch) == list(range(n))  # disjoint and complete


@pytest.mark.parametrize(("count", "batch_size"), [(1, 8), (2, 8), (3, 6)])
def test_eval_padding_counts_every_record_once(base, count, batch_size):
    cfg, records, tok = base
    n = len(records)
    per_process = [
        list(
            eval_batches(
                cfg, records, tok, batch_size=batch_size, process_index=p, process_count=count
            )
        )
        for p in range(count)
    ]
    local = batch_size // count
    expected_batches = math.ceil(math.ceil(n / count) / local)
    seen = []
    for batches in per_process:
        assert len(batches) == expected_batches
        for b in batches:
            assert b["valid"].dtype == bool and b["valid"].shape == (local,)
            assert b["image"].shape[0] == local
            seen += list(b["index"][b["valid"]])
    assert sorted(seen) == list(range(n))
    assert sum(int(b["valid"].sum()) for bs in per_process for b in bs) == n


@dataclasses.dataclass(frozen=True)
class WordCount:
    """A picklable hook: the report's word count and the first letters' codes."""

    letters: int = 3

    def __call__(self, record: Record) -> dict:
        codes = [ord(c) for c in record.text[: self.letters]]
        return {"num_words": np.int32(len(record.text.split())), "codes": np.array(codes, np.int32)}


def clashing_hook(record: Record) -> dict:
    return {"labels": np.zeros(14, np.float32)}


def test_hooks_add_fields(base):
    cfg, records, tok = base
    batch = next(train_iterator(cfg, records, tok, seed=0, hooks=(WordCount(),)))
    assert batch["codes"].shape == (6, 3) and batch["num_words"].dtype == np.int32
    for row, i in enumerate(batch["index"]):
        assert batch["num_words"][row] == len(records[i].text.split())
        assert bytes(batch["codes"][row].astype(np.uint8)).decode() == records[i].text[:3]
    batch = next(eval_batches(cfg, records, tok, batch_size=4, hooks=(WordCount(2),)))
    assert batch["codes"].shape == (4, 2)
    with pytest.raises(ValueError, match="'labels'"):
        next(train_iterator(cfg, records, tok, seed=0, hooks=(clashing_hook,)))


def test_state_restore_gives_the_same_next_batches(base):
    cfg, records, tok = base
    it = train_iterator(cfg, records, tok, seed=0, process_index=1, process_count=2)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # Orbax stores it as JSON
    expected = _take(it, 3)
    fresh = train_iterator(cfg, records, tok, seed=0, process_index=1, process_count=2)
    fresh.set_state(state)
    got = _take(fresh, 3)
    for key in ("index", "image", "input_ids"):
        np.testing.assert_array_equal(_flat(got, key), _flat(expected, key))


def test_state_from_another_layout_is_refused(base):
    cfg, records, tok = base
    it = train_iterator(cfg, records, tok, seed=0, process_index=0, process_count=2)
    next(it)
    state = it.get_state()
    with pytest.raises(ValueError, match=r"process_count=2.*process_count=1"):
        train_iterator(cfg, records, tok, seed=0).set_state(state)
    with pytest.raises(ValueError, match="records"):
        train_iterator(cfg, records[1:], tok, seed=0, process_count=2).set_state(state)


def test_worker_processes_give_the_same_batches(base):
    cfg, records, tok = base
    workers = _cfg(cfg, num_workers=2, prefetch=1)
    expected = _take(train_iterator(cfg, records, tok, seed=0), 4)
    it = train_iterator(workers, records, tok, seed=0)
    try:
        got = _take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        got += _take(it, 2)
        it.set_state(state)  # rewinds the worker processes
        restored = _take(it, 2)
    finally:
        it.close()
    assert all(type(v) is np.ndarray for v in got[0].values())
    for key in ("index", "image", "labels"):
        np.testing.assert_array_equal(_flat(got, key), _flat(expected, key))
    np.testing.assert_array_equal(_flat(restored, "image"), _flat(expected[2:], "image"))


def test_undecodable_image_in_pipeline_names_its_path(base, tmp_path):
    cfg, records, tok = base
    data = bytearray(Path(records[0].image_path).read_bytes())
    data[200:-2] = b"\x00" * (len(data) - 202)  # markers intact, scan data destroyed
    path = tmp_path / "broken.jpg"
    path.write_bytes(bytes(data))
    broken = [dataclasses.replace(records[0], image_path=str(path)), *records[1:4]]
    with pytest.raises(BadRecordError, match=r"broken\.jpg") as info:
        next(eval_batches(_cfg(cfg, on_bad_record="error"), broken, tok, batch_size=4))
    assert info.value.path == str(path) and info.value.reason.startswith("corrupt_image")
    # worker processes send it pickled: path and reason must survive
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.path, again.reason) == (info.value.path, info.value.reason)


def test_batch_size_must_divide(base):
    cfg, records, tok = base
    with pytest.raises(ValueError, match="not divisible by process_count=4"):
        train_iterator(cfg, records, tok, seed=0, process_count=4)
    with pytest.raises(ValueError, match="channels"):
        next(train_iterator(_cfg(cfg, channels=2), records, tok, seed=0))


@pytest.mark.parametrize("angle", [30.0, 90.0])
def test_rotation_range_turns_counter_clockwise_as_torchvision(angle):
    """`data.augment.affine_degrees=(lo, hi)` follows torchvision's RandomRotation: a
    positive angle turns the image counter-clockwise (a number d stays the range +-d)."""
    from torchvision.transforms.functional import rotate

    from medvlp_jax.data.transforms import ImageSpec, _augment, rotation_range

    assert rotation_range(5.0) == (-5.0, 5.0) and rotation_range((0, 90)) == (0.0, 90.0)
    with pytest.raises(ValueError, match="affine_degrees"):
        rotation_range((10, 0))
    pixels = np.zeros((64, 64), np.uint8)
    pixels[28:36, 50:58] = 255  # a square right of the centre
    image = Image.fromarray(pixels)
    spec = ImageSpec(64, 1, (0.0,), (1.0,), True, (1.0, 1.0), (1.0, 1.0), (angle, angle))
    ours = np.asarray(_augment(image, spec, np.random.default_rng(0)), np.float32)
    theirs = np.asarray(rotate(image, angle), np.float32)

    def centre(a):
        rows, cols = np.nonzero(a > 127)
        return rows.mean(), cols.mean()

    np.testing.assert_allclose(centre(ours), centre(theirs), atol=1.0)
    assert centre(ours)[0] < 28  # moved up: counter-clockwise on screen
