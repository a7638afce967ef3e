"""SynthCXR: determinism, MIMIC layout, labels <-> reports <-> pixels agreement, zero-shot list."""

import csv
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medvlp_jax.data.records import CHEXPERT_CLASSES, FIVE_CLASSES
from medvlp_jax.data.synthcxr import (
    BOXES_CSV,
    CHEXPERT_CSV,
    INFO_JSON,
    METADATA_CSV,
    SPLIT_CSV,
    ZERO_SHOT_CSV,
    ensure_synthcxr,
    generate,
    read_masks,
)
from medvlp_jax.data.synthcxr import dataset as dataset_module
from medvlp_jax.data.synthcxr.__main__ import main as cli_main

# Words of MCPL's published anatomy / pathology keyword vocabularies that reports must use.
ANATOMY = (
    "pleural", "lung", "pulmonary", "lungs", "chest", "silhouette", "mediastinal",
    "cardiomediastinal", "heart", "hilar", "tube", "osseous", "lobe", "vascular", "catheter",
    "bibasilar", "costophrenic", "picc", "svc", "jugular", "nasogastric", "pacemaker",
    "diaphragm", "perihilar", "hila", "rib", "sternotomy", "stomach", "atrium", "ventricle",
    "retrocardiac", "hemithorax", "aortic", "trachea",
)  # fmt: skip
PATHOLOGY = (
    "effusion", "pneumothorax", "consolidation", "focal", "cardiac", "atelectasis", "edema",
    "opacity", "effusions", "opacities", "pneumonia", "congestion", "cardiomegaly", "carina",
    "fracture", "mediastinum", "thickening", "nodule", "opacification", "streaky",
)  # fmt: skip


def _cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "medvlp-data-cache"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure_synthcxr(_cache(tmp_path_factory), 40, 64, 0)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """Enough studies for statistics on findings (a few seconds to generate)."""
    return ensure_synthcxr(_cache(tmp_path_factory), 160, 64, 1)


def _rows(root: Path, name: str) -> list[dict]:
    with open(root / name, newline="") as f:
        return list(csv.DictReader(f))


class Study:
    """One study read back from the tree: labels, report text, frontal image."""

    def __init__(self, root: Path, meta: dict, labels: dict):
        s = meta["subject_id"]
        self.dicom = meta["dicom_id"]
        self.labels = labels
        path = root / f"reports/files/p{s[:2]}/p{s}/s{meta['study_id']}.txt"
        self.report = " ".join(path.read_text().split())
        folder = root / f"files/p{s[:2]}/p{s}/s{meta['study_id']}"
        self.image = np.asarray(Image.open(folder / f"{self.dicom}.jpg"), np.float32)
        self.mask_path = folder / f"{self.dicom}_mask.png"

    def sentences(self) -> list[str]:
        return re.split(r"(?<=\.)\s+", self.report)


def _frontal_studies(root: Path) -> list[Study]:
    labels = {r["study_id"]: r for r in _rows(root, CHEXPERT_CSV)}
    return [
        Study(root, m, labels[m["study_id"]])
        for m in _rows(root, METADATA_CSV)
        if m["ViewPosition"] in ("PA", "AP")
    ]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_two_runs_are_byte_identical(tmp_path, tiny):
    # `tiny` was written by one process; this run renders in two worker processes
    again = generate(tmp_path / "again", 40, 64, 0, workers=2)
    assert _tree_bytes(again) == _tree_bytes(tiny)
    seed0, seed1 = generate(tmp_path / "s0", 6, 32, 0), generate(tmp_path / "s1", 6, 32, 1)
    assert _tree_bytes(seed0).keys() != _tree_bytes(seed1).keys()


def test_layout_and_csv_columns(tiny):
    meta = _rows(tiny, METADATA_CSV)
    assert list(meta[0])[:7] == [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
        "ViewPosition", "Rows", "Columns",
    ]  # fmt: skip
    chex = _rows(tiny, CHEXPERT_CSV)
    assert list(chex[0]) == ["subject_id", "study_id", *sorted(CHEXPERT_CLASSES)]
    assert {v for r in chex for c in CHEXPERT_CLASSES for v in [r[c]]} <= {"1.0", "0.0", "-1.0", ""}
    split = _rows(tiny, SPLIT_CSV)
    assert list(split[0]) == ["dicom_id", "study_id", "subject_id", "split"]
    assert {r["split"] for r in split} == {"train", "validate", "test"}
    assert len(chex) == 40 and len(split) == len(meta)
    views = {r["ViewPosition"] for r in meta}
    assert {"PA", "AP"} <= views and views & {"LATERAL", "LL"}
    for m in meta:
        s = m["subject_id"]
        assert re.fullmatch(r"1[0-9]{7}", s) and re.fullmatch(r"5[0-9]{7}", m["study_id"])
        folder = tiny / "files" / f"p{s[:2]}" / f"p{s}" / f"s{m['study_id']}"
        img = Image.open(folder / f"{m['dicom_id']}.jpg")
        assert img.format == "JPEG" and img.mode == "L" and img.size == (64, 64)
        assert (int(m["Rows"]), int(m["Columns"])) == (64, 64)
        assert (
            tiny / "reports" / "files" / f"p{s[:2]}" / f"p{s}" / f"s{m['study_id']}.txt"
        ).exists()
    # subjects are split as a whole
    subject_split = {}
    for r in split:
        assert subject_split.setdefault(r["subject_id"], r["split"]) == r["split"]
    info = json.loads((tiny / INFO_JSON).read_text())
    assert info["num_studies"] == 40 and info["num_images"] == len(meta)


def test_reports_sections_hedges_and_negations(medium):
    studies = _frontal_studies(medium)
    reports = [s.report for s in studies]
    assert all("IMPRESSION:" in r for r in reports)
    impression_only = [r for r in reports if "FINDINGS:" not in r]
    assert 0 < len(impression_only) < len(reports) // 3
    for s in studies:
        for name in CHEXPERT_CLASSES:
            if s.labels[name] == "-1.0":  # hedged
                assert re.search(r"possible|cannot be excluded|may |questionable", s.report, re.I)
        if s.labels["Pleural Effusion"] == "0.0":
            assert re.search(
                r"no (pleural effusion|pneumothorax or pleural effusion)", s.report, re.I
            )
        if s.labels["No Finding"] == "1.0":
            assert not any(s.labels[c] in ("1.0", "-1.0") for c in FIVE_CLASSES)
    # varied wording: many distinct sentences for the same finding
    effusion = {x for s in studies for x in s.sentences() if "effusion" in x and "No" not in x}
    assert len(effusion) >= 10


def test_mcpl_keywords_found(medium):
    vocab = json.loads(
        resources.files("medvlp_jax.data").joinpath("mcpl_ap_vocab.json").read_text()
    )
    assert set(ANATOMY) <= set(vocab["anatomy"]) and set(PATHOLOGY) <= set(vocab["pathology"])
    words = set()
    for s in _frontal_studies(medium):
        words |= set(re.findall(r"[a-z]+", s.report.lower()))
    assert [w for w in ANATOMY if w not in words] == []
    assert [w for w in PATHOLOGY if w not in words] == []
    assert sum(w in words for w in vocab["anatomy"]) >= 45
    assert sum(w in words for w in vocab["pathology"]) >= 20
    # each stated finding carries its keyword
    keyword = {
        "Pleural Effusion": "effusion",
        "Pneumothorax": "pneumothorax",
        "Edema": "edema",
        "Atelectasis": "atelectasis",
        "Consolidation": "consolidation",
    }
    for s in _frontal_studies(medium):
        for name, word in keyword.items():
            if s.labels[name] == "1.0":
                assert word in s.report.lower()


def _effusion_sides(study: Study) -> set[str]:
    sides = set()
    for sent in study.sentences():
        if "effusion" in sent and not re.match(r"(No|There is no)\b", sent):
            if "bilateral" in sent:
                sides |= {"right", "left"}
            sides |= {s for s in ("right", "left") if re.search(rf"\b{s}\b", sent)}
    return sides


def test_effusion_side_in_report_is_the_brighter_base(medium):
    """Patient right is image left. Compare the lateral lung bases' mean intensity."""
    confounders = ("Atelectasis", "Consolidation", "Pneumonia", "Lung Lesion")
    checked, correct = 0, 0
    for s in _frontal_studies(medium):
        if s.labels["Pleural Effusion"] != "1.0" or any(
            s.labels[c] in ("1.0", "-1.0") for c in confounders
        ):
            continue
        sides = _effusion_sides(s)
        if len(sides) != 1:
            continue
        n = s.image.shape[0]
        rows = slice(int(0.59 * n), int(0.73 * n))
        right = s.image[rows, int(0.14 * n) : int(0.25 * n)].mean()
        left = s.image[rows, int(0.75 * n) : int(0.86 * n)].mean()
        checked += 1
        correct += ("right" if right > left else "left") == sides.pop()
    assert checked >= 6
    assert correct >= 0.9 * checked, (correct, checked)


def _heart_to_thorax(image: np.ndarray) -> float:
    """Median over rows at heart level of (bright central run) / (lung-to-lung width)."""
    n = image.shape[0]
    c = n // 2
    ratios = []
    for rc in np.arange(0.52, 0.645, 0.02):
        r0 = int(rc * n)
        p = ndimage.uniform_filter1d(image[r0 - n // 32 : r0 + n // 32 + 1].mean(0), 3)
        lung = min(p[int(0.15 * n) : int(0.4 * n)].min(), p[int(0.6 * n) : int(0.85 * n)].min())
        t = 0.5 * (lung + np.median(p[c - n // 16 : c + n // 16]))
        bright = p > t
        lo = c - np.argmin(bright[c::-1])  # first dark pixel left of centre (+1)
        hi = c + np.argmin(bright[c:])
        outer_lo = lo - np.argmax(bright[lo::-1])  # the chest wall beyond the lung
        outer_hi = hi + np.argmax(bright[hi:])
        ratios.append((hi - lo) / max(outer_hi - outer_lo, 1))
    return float(np.median(ratios))


def test_cardiomegaly_is_a_wider_heart(medium):
    enlarged, normal = [], []
    for s in _frontal_studies(medium):
        if s.labels["Cardiomegaly"] == "1.0":
            enlarged.append(_heart_to_thorax(s.image))
        elif s.labels["Cardiomegaly"] == "0.0":
            normal.append(_heart_to_thorax(s.image))
    enlarged, normal = np.array(enlarged), np.array(normal)
    assert len(enlarged) >= 8 and len(normal) >= 20
    assert np.median(enlarged) > np.median(normal) + 0.05
    # rank separation (AUC): a random enlarged heart measures wider than a random normal one
    auc = (enlarged[:, None] > normal[None, :]).mean()
    assert auc > 0.9, auc


def test_masks_and_boxes_match_labels(medium):
    boxes = {}
    for r in _rows(medium, BOXES_CSV):
        boxes.setdefault(r["dicom_id"], []).append(r)
    for s in _frontal_studies(medium):
        masks = read_masks(s.mask_path)
        stated = {c for c in CHEXPERT_CLASSES if s.labels[c] in ("1.0", "-1.0")} - {"No Finding"}
        assert set(masks) <= stated | {"Lung Opacity"}
        for name in ("Pleural Effusion", "Cardiomegaly", "Edema", "Consolidation", "Pneumothorax"):
            if s.labels[name] == "1.0":
                assert name in masks, (s.dicom, name)
        for b in boxes.get(s.dicom, []):
            x0, y0, x1, y1 = (int(b[k]) for k in ("x0", "y0", "x1", "y1"))
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert masks[b["finding"]][y0:y1, x0:x1].any()
        if s.labels["No Finding"] == "1.0":
            assert set(masks) <= {"Support Devices"}


def test_zero_shot_list_is_balanced_single_positive(medium):
    rows = _rows(medium, ZERO_SHOT_CSV)
    per_class = json.loads((medium / INFO_JSON).read_text())["zero_shot_per_class"]
    assert per_class == 160 // 50
    assert [r["label"] for r in rows] == [c for c in FIVE_CLASSES for _ in range(per_class)]
    split = {r["dicom_id"]: r["split"] for r in _rows(medium, SPLIT_CSV)}
    views = {r["dicom_id"]: r["ViewPosition"] for r in _rows(medium, METADATA_CSV)}
    labels = {r["study_id"]: r for r in _rows(medium, CHEXPERT_CSV)}
    for r in rows:
        assert split[r["dicom_id"]] == "test" and views[r["dicom_id"]] in ("PA", "AP")
        five = {c: labels[r["study_id"]][c] for c in FIVE_CLASSES}
        assert [c for c, v in five.items() if v in ("1.0", "-1.0")] == [r["label"]]
        assert five[r["label"]] == "1.0"


def test_too_few_test_studies_for_zero_shot(tmp_path):
    with pytest.raises(ValueError, match="zero_shot_per_class"):
        generate(tmp_path / "x", 10, 64, 0, zero_shot_per_class=5)


def _entries(folder: Path) -> list[str]:
    """Folder entries other than lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_ensure_reuses_and_is_atomic(tmp_path, monkeypatch):
    root = ensure_synthcxr(tmp_path, 12, 32, 3)
    assert root == tmp_path / "synthcxr-n12-s32-seed3" and (root / INFO_JSON).exists()
    assert _entries(tmp_path) == [root.name]  # no temporary left behind

    def fail(*args, **kwargs):
        raise AssertionError("should not regenerate")

    monkeypatch.setattr(dataset_module, "generate", fail)
    assert ensure_synthcxr(tmp_path, 12, 32, 3) == root

    def interrupted(out_dir, *args, **kwargs):
        Path(out_dir, "files").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_module, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthcxr(tmp_path, 13, 32, 3)
    assert _entries(tmp_path) == [root.name]  # nothing half-written


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_JAX_CACHE", str(tmp_path / "env-cache"))
    root = ensure_synthcxr("", 8, 32, 0)
    assert root.parent == tmp_path / "env-cache"


def test_cli(tmp_path, capsys):
    cli_main(["--out", str(tmp_path / "cli"), "--num-studies", "8", "--image-size", "32"])
    info = json.loads(capsys.readouterr().out)
    assert info["num_studies"] == 8 and info["seconds"] > 0
    assert (tmp_path / "cli" / METADATA_CSV).exists()
