"""Label-fraction lists: generated SynthCXR lists, user (BenchX-format) lists, the filter."""

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from medvlp_jax.data.bad_records import BadRecordReport
from medvlp_jax.data.config import default_data_config
from medvlp_jax.data.label_fractions import (
    LISTED_NOT_LOADED,
    NOT_LISTED,
    read_split_list,
    write_synthcxr_splits,
)
from medvlp_jax.data.records import CHEXPERT_CLASSES, Record
from medvlp_jax.data.sources import load_records
from medvlp_jax.data.synthcxr import METADATA_CSV, SPLIT_CSV, ensure_synthcxr

NUM_STUDIES, IMAGE_SIZE = 300, 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("label-fraction-cache")


@pytest.fixture(scope="module")
def tree(cache) -> Path:
    return ensure_synthcxr(cache, NUM_STUDIES, IMAGE_SIZE, 0)


def _cfg(cache: Path, **overrides):
    cfg = default_data_config()
    cfg.cache_dir = str(cache)
    cfg.synthcxr.num_studies = NUM_STUDIES
    cfg.synthcxr.image_size = IMAGE_SIZE
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _dicom(record) -> str:
    return Path(record.image_path).stem


def _lists(tree: Path) -> dict[int, list[str]]:
    return {p: read_split_list(tree / "splits" / f"train_{p}.txt") for p in (1, 10, 100)}


def _rows(tree: Path, name: str) -> list[dict]:
    with open(tree / name, newline="") as f:
        return list(csv.DictReader(f))


def _train_dicoms(tree: Path, frontal: bool) -> list[str]:
    views = {r["dicom_id"]: r["ViewPosition"] for r in _rows(tree, METADATA_CSV)}
    return sorted(
        r["dicom_id"]
        for r in _rows(tree, SPLIT_CSV)
        if r["split"] == "train" and (views[r["dicom_id"]] in ("PA", "AP")) == frontal
    )


def _fake(n: int, labels) -> list[Record]:
    return [Record(f"/x/img{k:05d}.jpg", "text", labels[k]) for k in range(n)]


# ----- generated SynthCXR lists --------------------------------------------------------------


def test_synthcxr_lists_nested_sized_and_cover_every_class(cache, tree):
    train = load_records(_cfg(cache), "train")
    load_records(_cfg(cache, label_fraction=0.1), "train")  # writes the lists
    lists = _lists(tree)
    assert lists[10][: len(lists[1])] == lists[1]  # prefixes of one order: nested
    assert lists[100][: len(lists[10])] == lists[10]
    assert sorted(lists[100]) == _train_dicoms(tree, frontal=True)
    n = len(lists[100])
    # Sizes: ceil(p * N / 100), the 1% list lengthened by at most one pick per class.
    assert math.ceil(n / 100) <= len(lists[1]) <= max(math.ceil(n / 100), len(CHEXPERT_CLASSES))
    assert len(lists[10]) == max(math.ceil(n / 10), len(lists[1]))
    by_id = {_dicom(r): r for r in train}
    for k, name in enumerate(CHEXPERT_CLASSES):
        if any(r.labels[k] == 1.0 for r in train):
            assert any(by_id[i].labels[k] == 1.0 for i in lists[1]), name


def test_synthcxr_lists_are_deterministic(cache, tree, tmp_path):
    load_records(_cfg(cache, label_fraction=0.01), "train")
    files = sorted((tree / "splits").glob("train_*.txt"))
    assert [f.name for f in files] == ["train_1.txt", "train_10.txt", "train_100.txt"]
    before = {f.name: f.read_bytes() for f in files}
    shutil.rmtree(tree / "splits")
    load_records(_cfg(cache, label_fraction=0.01), "train")
    assert {f.name: f.read_bytes() for f in (tree / "splits").glob("train_*.txt")} == before
    records = load_records(_cfg(cache), "train")
    rng = np.random.default_rng(1)
    shuffled = [records[i] for i in rng.permutation(len(records))]
    folder = write_synthcxr_splits(shuffled, tmp_path, seed=0)
    assert {f.name: f.read_bytes() for f in folder.glob("train_*.txt")} == before
    assert not list(folder.glob(".*"))  # no temporary files left


def test_list_sizes_are_ceil_of_the_percentage(tmp_path):
    rng = np.random.default_rng(0)
    common = rng.choice([0.0, 1.0], size=(2001, len(CHEXPERT_CLASSES)), p=(0.7, 0.3))
    folder = write_synthcxr_splits(_fake(2001, common), tmp_path / "large", seed=3)
    assert [len(read_split_list(folder / f"train_{p}.txt")) for p in (1, 10, 100)] == [
        21,
        201,
        2001,
    ]
    # One positive record per class among 30: the 1% list holds all 14 picks.
    rare = np.full((30, len(CHEXPERT_CLASSES)), np.nan, np.float32)
    rare[np.arange(len(CHEXPERT_CLASSES)), np.arange(len(CHEXPERT_CLASSES))] = 1.0
    folder = write_synthcxr_splits(_fake(30, rare), tmp_path / "small", seed=3)
    lists = {p: read_split_list(folder / f"train_{p}.txt") for p in (1, 10, 100)}
    assert [len(lists[p]) for p in (1, 10, 100)] == [14, 14, 30]
    assert sorted(lists[1]) == [f"img{k:05d}" for k in range(14)]


def test_load_records_keeps_the_listed_records_in_order(cache, tree):
    full = {s: load_records(_cfg(cache), s) for s in ("train", "validate", "test")}
    report = BadRecordReport()
    cfg = _cfg(cache, label_fraction=0.1)
    subset = load_records(cfg, "train", report)
    listed = set(_lists(tree)[10])
    assert [_dicom(r) for r in subset] == [_dicom(r) for r in full["train"] if _dicom(r) in listed]
    assert {_dicom(r) for r in subset} == listed
    assert report.filtered[NOT_LISTED] == len(full["train"]) - len(subset)
    assert report.filtered[LISTED_NOT_LOADED] == 0
    for split in ("validate", "test"):
        assert [_dicom(r) for r in load_records(cfg, split)] == [_dicom(r) for r in full[split]]


# ----- user lists ----------------------------------------------------------------------------


def test_user_list_for_a_mimic_layout_source(cache, tree, tmp_path):
    frontal, lateral = _train_dicoms(tree, True), _train_dicoms(tree, False)
    (tmp_path / "train_5.txt").write_text(
        f"# a 5% list\n\n{frontal[3]}\n  {frontal[0]}.jpg  \nfiles/p1/x/{frontal[7]}.jpg\n"
        f"{frontal[0]}\n{lateral[0]}\n"
    )
    report = BadRecordReport()
    cfg = _cfg(cache, source="mimic", root=str(tree), split_dir=str(tmp_path), label_fraction=0.05)
    records = load_records(cfg, "train", report)
    listed = {frontal[0], frontal[3], frontal[7]}
    everything = load_records(_cfg(cache), "train")  # (subject, study, dicom) order
    assert [_dicom(r) for r in records] == [_dicom(r) for r in everything if _dicom(r) in listed]
    assert report.filtered[LISTED_NOT_LOADED] == 1  # the lateral image (frontal_only)
    # 100% with a split folder: train_100.txt, else BenchX's train.txt.
    (tmp_path / "train.txt").write_text("\n".join(frontal[:2]) + "\n")
    records = load_records(_cfg(cache, split_dir=str(tmp_path)), "train")
    assert sorted(_dicom(r) for r in records) == frontal[:2]


def test_user_list_for_a_manifest(tree, tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for k, dicom in enumerate(_train_dicoms(tree, True)[:4]):
        image = next((tree / "files").rglob(f"{dicom}.jpg"))
        shutil.copy(image, tmp_path / "img" / f"{k}.jpg")
        split = "test" if k == 3 else "train"
        rows.append(dict(image=f"img/{k}.jpg", text=f"Report {k} with an effusion.", split=split))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "split"])
        writer.writeheader()
        writer.writerows(rows)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_10.txt").write_text("img/2.jpg\n./img/0.jpg\n")
    cfg = default_data_config()
    cfg.update(source="manifest", root=str(tmp_path / "m.csv"), split_dir=str(lists))
    cfg.label_fraction = 0.1
    records = load_records(cfg, "train")
    assert [Path(r.image_path).name for r in records] == ["0.jpg", "2.jpg"]
    assert len(load_records(cfg, "test")) == 1
    (lists / "train_10.txt").write_text("img/3.jpg\n")  # a test image
    with pytest.raises(ValueError, match=r"train_10\.txt.*not training images.*img/3\.jpg"):
        load_records(cfg, "train")


# ----- errors --------------------------------------------------------------------------------


def test_errors_name_the_file_and_the_field(cache, tree, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"splits/train_5\.txt.*data\.label_fraction"):
        load_records(_cfg(cache, label_fraction=0.05), "train")
    validate = sorted(r["dicom_id"] for r in _rows(tree, SPLIT_CSV) if r["split"] == "validate")
    (tmp_path / "train_1.txt").write_text(f"{_train_dicoms(tree, True)[0]}\n{validate[0]}\n")
    user = dict(source="mimic", root=str(tree), split_dir=str(tmp_path), label_fraction=0.01)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'train_1.txt'}.*{validate[0]}"):
        load_records(_cfg(cache, **user), "train")
    (tmp_path / "train_1.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no images"):
        load_records(_cfg(cache, **user), "train")
    with pytest.raises(FileNotFoundError, match=r"train_10\.txt.*data\.split_dir"):
        load_records(_cfg(cache, **{**user, "label_fraction": 0.1}), "train")
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"data\.label_fraction"):
            load_records(_cfg(cache, label_fraction=bad), "train")
    with pytest.raises(ValueError, match=r"data\.split_dir"):
        load_records(_cfg(cache, source="mimic", root=str(tree), label_fraction=0.1), "train")
    with pytest.raises(ValueError, match="roco"):
        load_records(_cfg(cache, source="roco", root=str(tree), label_fraction=0.1), "train")
