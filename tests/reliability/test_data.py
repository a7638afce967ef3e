"""Reliability, bad data: images that fail to decode only in the pipeline (training and
evaluation), the per-reason skip counts, and broken tables (csv files, manifests, captions)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tinyconfigs import tiny_clip

from medvlp_jax import train
from medvlp_jax.data import sources
from medvlp_jax.data.bad_records import (
    BAD_FIELD,
    BadRecordError,
    BadRecordReport,
    reason_code,
)
from medvlp_jax.data.images import check_image
from medvlp_jax.data.mimic import CHEXPERT, METADATA, SPLIT
from medvlp_jax.data.pipeline import eval_batches, train_iterator
from medvlp_jax.data.records import CHEXPERT_CLASSES
from medvlp_jax.data.synthcxr import ZERO_SHOT_CSV
from medvlp_jax.data.tables import TableError
from medvlp_jax.data.tokenize import load_tokenizer

BATCH = 4
CORRUPT = reason_code("corrupt_image")


def corrupt_mid_file(src: str, dst: Path) -> Path:
    """A copy of the JPEG `src` with a stray frame header halfway through its scan data: the
    markers at both ends are intact (data.image_check='header' passes) but decoding fails."""
    data = Path(src).read_bytes()
    sos = data.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    middle = scan + (len(data) - scan) // 2
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[:middle] + b"\xff\xc0\x00\x11" + bytes(15) + data[middle:])
    assert check_image(str(dst), "header") is None
    assert check_image(str(dst), "decode").startswith("corrupt_image: OSError")
    return dst


@pytest.fixture(scope="module")
def tree() -> Path:
    """The tiny CLIP config's SynthCXR tree (shared with the other tests' cache)."""
    return sources.synthcxr_root(tiny_clip().data)


def _data_cfg(root: Path, **overrides):
    cfg = tiny_clip().data
    cfg.source, cfg.root, cfg.batch_size, cfg.prefetch = "mimic", str(root), BATCH, 0
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def twelve(tree, tmp_path_factory):
    """(config, 12 training records whose record 3 fails to decode, its path, tokenizer)."""
    cfg = _data_cfg(tree)
    records = sources.load_records(cfg, "train")[:12]
    broken = corrupt_mid_file(records[3].image_path, tmp_path_factory.mktemp("bad") / "b.jpg")
    records[3] = dataclasses.replace(records[3], image_path=str(broken))
    return cfg, records, broken, load_tokenizer(cfg.tokenizer)


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _bad_warnings(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]


# ----- the per-reason skip counter -----------------------------------------------------------


def test_skip_counts_sum_the_reasons_of_one_key():
    """Two reasons with the same key once overwrote each other's count."""
    report = BadRecordReport()
    report.bad("skip", "a.jpg", "corrupt_image: not a JPEG (no SOI marker)")
    report.bad("skip", "b.jpg", "corrupt_image: JPEG end marker missing (truncated file?)")
    report.bad("skip", "c.jpg", "corrupt_image: JPEG end marker missing (truncated file?)")
    report.bad("skip", "d.jpg", "missing_image: file not found")
    report.filter("short_text")
    assert report.metrics("data/train/") == {
        "data/train/skipped": 4,
        "data/train/skipped/corrupt_image": 3,
        "data/train/skipped/missing_image": 1,
        "data/train/filtered/short_text": 1,
    }


# ----- an image that fails to decode in the pipeline ------------------------------------------


def test_training_replaces_an_image_that_fails_to_decode(twelve, caplog):
    cfg, records, broken, tok = twelve
    with caplog.at_level(logging.WARNING):
        it = train_iterator(cfg, records, tok, seed=0)
        batches = _take(it, 6)  # two epochs of 12
    index = np.concatenate([b["index"] for b in batches])
    assert all(b["image"].shape[0] == BATCH and BAD_FIELD not in b for b in batches)
    assert 3 not in index  # the next record stands in for it, once per epoch
    assert np.bincount(index[:12], minlength=12).tolist() == [1, 1, 1, 0, 2] + [1] * 7
    assert it.bad_record_metrics() == {
        "data/train/replaced": 2,
        "data/train/replaced/corrupt_image": 2,
    }
    (warning,) = _bad_warnings(caplog, broken)  # once per file
    assert warning == (
        f"Bad record {broken}: corrupt_image: OSError: broken data stream when reading image "
        "file (data.image_check='decode' finds such files when records are loaded); replaced "
        "by the next good record (data.on_bad_record='skip')"
    )


def test_a_resumed_iterator_replaces_alike_and_keeps_the_counts(twelve):
    cfg, records, _, tok = twelve
    it = train_iterator(cfg, records, tok, seed=0)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # Orbax stores it as JSON
    expected = _take(it, 3)
    fresh = train_iterator(cfg, records, tok, seed=0)
    fresh.set_state(state)
    got = _take(fresh, 3)
    for key in ("index", "image", "input_ids"):
        np.testing.assert_array_equal(
            np.concatenate([b[key] for b in got]), np.concatenate([b[key] for b in expected])
        )
    assert fresh.bad_record_metrics() == it.bad_record_metrics()
    assert fresh.bad_record_metrics(gather=True) == it.bad_record_metrics()  # one process
    assert fresh.bad_record_metrics("x/")["x/replaced"] == 2


def test_worker_processes_replace_and_count_alike(twelve):
    """The replacement happens in the workers, the counting in the main process."""
    cfg, records, _, tok = twelve
    expected = _take(train_iterator(cfg, records, tok, seed=0), 3)
    it = train_iterator(_data_cfg(Path(cfg.root), num_workers=2), records, tok, seed=0)
    try:
        got = _take(it, 3)
    finally:
        it.close()
    for key in ("index", "image"):
        np.testing.assert_array_equal(
            np.concatenate([b[key] for b in got]), np.concatenate([b[key] for b in expected])
        )
    assert it.bad_record_metrics()["data/train/replaced/corrupt_image"] == 1


def test_error_policy_stops_training_naming_the_image(twelve):
    cfg, records, broken, tok = twelve
    cfg = _data_cfg(Path(cfg.root), on_bad_record="error")
    with pytest.raises(BadRecordError, match=re.escape(f"bad record {broken}: corrupt_image")):
        _take(train_iterator(cfg, records, tok, seed=0), 3)


def test_evaluation_batches_mark_an_image_that_fails_to_decode(twelve, caplog):
    cfg, records, broken, tok = twelve
    with caplog.at_level(logging.WARNING):
        batches = list(eval_batches(cfg, records, tok, batch_size=8))
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    bad = np.concatenate([b[BAD_FIELD] for b in batches])
    assert sorted(index[valid]) == [i for i in range(12) if i != 3]
    assert index[bad > 0].tolist() == [3] and bad[bad > 0].tolist() == [CORRUPT]
    assert not valid[index == 3].any()
    (warning,) = _bad_warnings(caplog, broken)
    assert warning.endswith("; left out of the evaluation (data.on_bad_record='skip')")


# ----- whole runs ------------------------------------------------------------------------------


def _manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "text", "split"])
        writer.writerows(rows)
    return path


def _saved_data_state(workdir: Path, step: int) -> dict:
    (path,) = (workdir / "checkpoints" / str(step) / "data").glob("*.json")
    return json.loads(path.read_text())


def test_tiny_clip_trains_over_an_image_that_fails_to_decode(tmp_path, caplog):
    """16 good training images and one that decodes only halfway: the run finishes, the bad
    image is replaced every time it comes up, and the checkpointed iterator counts it."""
    good = sources.load_records(tiny_clip().data, "train")[:16]
    broken = corrupt_mid_file(good[5].image_path, tmp_path / "images" / "broken.jpg")
    rows = [(r.image_path, r.text, "train") for r in good]
    rows.insert(7, (str(broken), good[5].text, "train"))
    manifest = _manifest(tmp_path / "manifest.csv", rows)
    overrides = ("data.source=manifest", f"data.root={manifest}")
    config = tiny_clip(*overrides, "train.num_steps=2", "train.checkpoint_every=2")
    workdir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        train.run(config, workdir)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [2]
    assert len(_bad_warnings(caplog, broken)) == 1
    # The 32 examples of two steps cover the 17 records once, and most of them twice.
    records = sources.load_records(config.data, "train")
    it = train_iterator(config.data, records, load_tokenizer(""), seed=config.seed)
    _take(it, 2)
    expected = it.bad_record_metrics()
    assert expected["data/train/replaced/corrupt_image"] >= 1
    assert (
        lines[-1]["data/train/replaced/corrupt_image"]
        == (expected["data/train/replaced/corrupt_image"])
    )
    assert _saved_data_state(workdir, 2)["bad"] == {
        "corrupt_image": expected["data/train/replaced/corrupt_image"]
    }


def test_a_corrupt_test_image_does_not_stop_the_final_evaluation(tree, tmp_path, caplog):
    """A test image of the zero-shot list that fails to decode: the final evaluation leaves it
    out of every evaluator (and says so in its metrics), and the last checkpoint is written."""
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    cfg = _data_cfg(root)
    test = sources.load_records(cfg, "test")
    with open(root / ZERO_SHOT_CSV, newline="") as f:
        listed = {row["dicom_id"] for row in csv.DictReader(f)}
    victim = next(r for r in test[:64] if Path(r.image_path).stem in listed)
    corrupt_mid_file(victim.image_path, tmp_path / "broken.jpg")
    shutil.copy(tmp_path / "broken.jpg", victim.image_path)
    config = tiny_clip(
        "data.source=mimic",
        f"data.root={root}",
        f"data.zero_shot_csv={root / ZERO_SHOT_CSV}",
        "evals.zero_shot.enabled=true",
        "evals.retrieval.enabled=true",
        "train.num_steps=2",
        "train.eval_every=2",
        "train.checkpoint_every=2",
    )
    workdir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        metrics = train.run(config, workdir)
    assert metrics["eval/mimic/left_out"] == 1.0
    assert metrics["eval/mimic/left_out/corrupt_image"] == 1.0
    assert {"eval/mimic/zero_shot_acc", "eval/mimic/i2t_R@1", "eval/mimic/i2t_P@1"} <= set(metrics)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    # The first evaluator to meet it (config.evals runs in name order) is rerun; the others
    # never see it.
    reruns = [m for m in _bad_warnings(caplog, Path(victim.image_path)) if "rerunning" in m]
    assert reruns == [
        f"config.evals.retrieval: left out 1 record(s) that failed in the eval pipeline "
        f"({victim.image_path} (corrupt_image)); rerunning it without them"
    ]


# ----- broken tables -------------------------------------------------------------------------


def _mimic_copy(tree: Path, root: Path) -> Path:
    """A MIMIC-layout folder with the tree's images and reports (linked) and its csv files
    (copied, to edit)."""
    root.mkdir()
    for name in ("files", "reports"):
        (root / name).symlink_to(tree / name)
    for name in (SPLIT, METADATA, CHEXPERT, ZERO_SHOT_CSV):
        shutil.copy(tree / name, root / name)
    return root


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _write(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def mimic(tree, tmp_path):
    """(folder, records of its train split) of an editable copy of the tree's csv files."""
    root = _mimic_copy(tree, tmp_path / "mimic")
    return root, sources.load_records(_data_cfg(root), "train")


def _append(path: Path, row: dict) -> int:
    """Appends `row` to the csv `path`; returns its line number."""
    columns, rows = _read(path)
    _write(path, columns, [*rows, row])
    return len(rows) + 2


def test_a_missing_label_column_is_an_error_naming_file_and_column(mimic, caplog):
    root, records = mimic
    columns, rows = _read(root / CHEXPERT)
    _write(root / CHEXPERT, [c for c in columns if c != "Edema"], rows)
    with pytest.raises(TableError) as info:
        sources.load_records(_data_cfg(root), "train")
    assert str(info.value).startswith(
        f"{root / CHEXPERT}: missing CheXpert label column(s) ['Edema']; has "
    )
    assert str(info.value).endswith(
        "; data.on_bad_csv='warn' would read them as unknown (NaN) for every row"
    )
    with caplog.at_level(logging.WARNING):
        loaded = sources.load_records(_data_cfg(root, on_bad_csv="warn"), "train")
    edema = CHEXPERT_CLASSES.index("Edema")
    assert len(loaded) == len(records) and np.isnan([r.labels[edema] for r in loaded]).all()
    assert any("missing CheXpert label column(s) ['Edema']" in m for m in caplog.messages)


def test_a_duplicate_split_row_is_an_error_and_is_not_trained_twice(mimic):
    root, records = mimic
    _, rows = _read(root / SPLIT)
    first = next(i for i, r in enumerate(rows) if r["split"] == "train")
    line = _append(root / SPLIT, rows[first])
    dicom = rows[first]["dicom_id"]
    message = (
        f"{root / SPLIT} line {line}: duplicate row for dicom_id={dicom!r} (the same as line "
        f"{first + 2}); data.on_bad_csv='warn' would keep the first row of each id"
    )
    with pytest.raises(TableError, match=f"^{re.escape(message)}$"):
        sources.load_records(_data_cfg(root), "train")
    loaded = sources.load_records(_data_cfg(root, on_bad_csv="warn"), "train")
    assert [r.image_path for r in loaded] == [r.image_path for r in records]


def test_an_image_in_two_splits_is_a_conflict(mimic):
    root, _ = mimic
    _, rows = _read(root / SPLIT)
    first = next(i for i, r in enumerate(rows) if r["split"] == "train")
    line = _append(root / SPLIT, {**rows[first], "split": "test"})
    message = (
        f"{root / SPLIT} lines {first + 2} and {line}: conflicting rows for "
        f"dicom_id={rows[first]['dicom_id']!r}: split 'train' vs 'test'"
    )
    with pytest.raises(TableError, match=f"^{re.escape(message)};"):
        sources.load_records(_data_cfg(root), "test")


def test_a_conflicting_label_row_is_an_error_and_does_not_overwrite_the_first(mimic):
    root, records = mimic
    _, rows = _read(root / CHEXPERT)
    row = next(r for r in rows if r["Edema"] == "")
    first = rows.index(row) + 2
    line = _append(root / CHEXPERT, {**row, "Edema": "1.0"})
    key = f"subject_id={row['subject_id']!r}, study_id={row['study_id']!r}"
    message = (
        f"{root / CHEXPERT} lines {first} and {line}: conflicting rows for {key}: "
        "Edema '' vs '1.0'; data.on_bad_csv='warn' would keep the first row of each id"
    )
    with pytest.raises(TableError, match=f"^{re.escape(message)}$"):
        sources.load_records(_data_cfg(root), "train")
    loaded = sources.load_records(_data_cfg(root, on_bad_csv="warn"), "train")
    np.testing.assert_array_equal(
        np.stack([r.labels for r in loaded]), np.stack([r.labels for r in records])
    )


def test_an_identical_label_row_with_other_number_spelling_is_a_duplicate(mimic):
    root, _ = mimic
    _, rows = _read(root / CHEXPERT)
    row = next(r for r in rows if r["Edema"] == "1.0")
    line = _append(root / CHEXPERT, {**row, "Edema": "1"})
    with pytest.raises(TableError, match=rf"line {line}: duplicate row for subject_id="):
        sources.load_records(_data_cfg(root), "train")


@pytest.mark.parametrize(
    ("name", "column", "value"), [(METADATA, "ViewPosition", "Frontal"), (SPLIT, "split", "val")]
)
def test_an_unknown_view_or_split_is_an_error_naming_row_and_value(mimic, name, column, value):
    root, _ = mimic
    columns, rows = _read(root / name)
    rows[4][column] = value
    _write(root / name, columns, rows)
    message = f"{root / name} line 6: column {column!r} has unknown value {value!r}; expected"
    with pytest.raises(TableError, match=f"^{re.escape(message)}"):
        sources.load_records(_data_cfg(root), "train")


def test_manifest_tables_are_checked(tree, tmp_path):
    records = sources.load_records(_data_cfg(tree), "train")[:4]
    rows = [(r.image_path, r.text, "train") for r in records]
    cfg = _data_cfg(tmp_path / "m.csv", source="manifest")
    # Several captions of one image are fine.
    _manifest(tmp_path / "m.csv", [*rows, (records[0].image_path, "another caption here", "train")])
    assert len(sources.load_records(cfg, "train")) == 5
    # The same image in two splits is not.
    _manifest(tmp_path / "m.csv", [*rows, (records[0].image_path, records[0].text, "test")])
    message = f"{tmp_path / 'm.csv'} lines 2 and 6: conflicting rows for image="
    with pytest.raises(TableError, match=f"^{re.escape(message)}.*split 'train' vs 'test'"):
        sources.load_records(cfg, "train")
    # A label column spelled otherwise would be ignored.
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "text", "Pleural_Effusion"])
        writer.writerows([(r.image_path, r.text, "1") for r in records])
    message = (
        f"{tmp_path / 'm.csv'}: column 'Pleural_Effusion' is not read as the CheXpert label "
        "'Pleural Effusion'"
    )
    with pytest.raises(TableError, match=f"^{re.escape(message)}"):
        sources.load_records(cfg, "train")


def test_a_caption_id_listed_twice_is_an_error(tree, tmp_path):
    folder = tmp_path / "roco" / "train" / "radiology"
    (folder / "images").mkdir(parents=True)
    record = sources.load_records(_data_cfg(tree), "train")[0]
    shutil.copy(record.image_path, folder / "images" / "ROCO_1.jpg")
    (folder / "captions.txt").write_text(
        "ROCO_1\t a chest radiograph with clear lungs\nROCO_1\t another caption entirely\n"
    )
    message = (
        f"{folder / 'captions.txt'} lines 1 and 2: conflicting rows for id='ROCO_1': caption "
        "'a chest radiograph with clear lungs' vs 'another caption entirely'"
    )
    with pytest.raises(TableError, match=f"^{re.escape(message)}"):
        sources.load_records(_data_cfg(tmp_path / "roco", source="roco"), "train")
