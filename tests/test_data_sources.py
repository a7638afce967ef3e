"""Record loaders: MIMIC-CXR-JPG (on a SynthCXR tree), ROCO, manifests, DICOM, bad records."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from medvlp_jax.data.bad_records import BadRecordError, BadRecordReport
from medvlp_jax.data.config import default_data_config
from medvlp_jax.data.dicom import read_dicom
from medvlp_jax.data.images import check_image, decode
from medvlp_jax.data.records import CHEXPERT_CLASSES, FIVE_CLASSES
from medvlp_jax.data.reports import parse_sections, select_text
from medvlp_jax.data.sources import balanced_five, load_records, load_zero_shot_records
from medvlp_jax.data.synthcxr import CHEXPERT_CSV, METADATA_CSV, SPLIT_CSV, ensure_synthcxr
from medvlp_jax.data.transforms import apply_uncertain_policy

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return ensure_synthcxr(tmp_path_factory.getbasetemp() / "medvlp-data-cache", 40, 64, 0)


def _cfg(**overrides):
    cfg = default_data_config()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _csv(root: Path, name: str) -> list[dict]:
    with open(root / name, newline="") as f:
        return list(csv.DictReader(f))


def _expected_dicoms(root: Path, split: str, frontal_only: bool = True) -> list[str]:
    views = {r["dicom_id"]: r["ViewPosition"] for r in _csv(root, METADATA_CSV)}
    return sorted(
        r["dicom_id"]
        for r in _csv(root, SPLIT_CSV)
        if r["split"] == split and (not frontal_only or views[r["dicom_id"]] in ("PA", "AP"))
    )


def _dicom(record) -> str:
    return Path(record.image_path).stem


# ----- MIMIC-CXR-JPG -------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "validate", "test"])
def test_mimic_counts_and_frontal_filter(tree, split):
    report = BadRecordReport()
    records = load_records(_cfg(source="mimic", root=str(tree)), split, report)
    assert sorted(_dicom(r) for r in records) == _expected_dicoms(tree, split)
    assert {r.view for r in records} <= {"PA", "AP"}
    lateral = len(_expected_dicoms(tree, split, False)) - len(_expected_dicoms(tree, split))
    assert report.filtered["not_frontal"] == lateral
    everything = load_records(_cfg(source="mimic", root=str(tree), frontal_only=False), split)
    assert sorted(_dicom(r) for r in everything) == _expected_dicoms(tree, split, False)


def test_mimic_labels_match_csv(tree):
    rows = {r["study_id"]: r for r in _csv(tree, CHEXPERT_CSV)}
    for r in load_records(_cfg(source="mimic", root=str(tree)), "train"):
        expected = [
            float(rows[r.study_id][c]) if rows[r.study_id][c] else np.nan for c in CHEXPERT_CLASSES
        ]
        np.testing.assert_array_equal(r.labels, np.array(expected, np.float32))
        assert r.subject_id and r.study_id and Path(r.image_path).exists()


def test_mimic_sections(tree):
    def report_of(r):
        s = r.subject_id
        return (tree / f"reports/files/p{s[:2]}/p{s}/s{r.study_id}.txt").read_text()

    first = load_records(_cfg(source="mimic", root=str(tree)), "train")
    findings_only = BadRecordReport()
    findings = load_records(
        _cfg(source="mimic", root=str(tree), sections=("findings",)), "train", findings_only
    )
    no_findings = [r for r in first if "FINDINGS:" not in report_of(r)]
    assert len(findings) == len(first) - len(no_findings) > 0
    assert findings_only.filtered["no_section"] == len(no_findings)
    impression = {
        r.image_path: r.text
        for r in load_records(
            _cfg(source="mimic", root=str(tree), sections=("impression",)), "train"
        )
    }
    concat = load_records(_cfg(source="mimic", root=str(tree), section_mode="concat"), "train")
    by_path = {r.image_path: r.text for r in first}
    for r in concat:
        raw = " ".join(report_of(r).split())
        impression_text = raw.split("IMPRESSION:")[1].strip()
        assert impression[r.image_path] == impression_text
        if "FINDINGS:" in raw:
            findings_text = raw.split("FINDINGS:")[1].split("IMPRESSION:")[0].strip()
            assert by_path[r.image_path] == findings_text  # 'first' takes FINDINGS
            assert r.text == f"{findings_text} {impression_text}"
        else:
            assert by_path[r.image_path] == r.text == impression_text
    short = BadRecordReport()
    assert (
        load_records(_cfg(source="mimic", root=str(tree), min_text_words=10_000), "train", short)
        == []
    )
    assert short.filtered["short_text"] == len(first)


def test_synthcxr_source_reads_the_cache(tree):
    cfg = _cfg(cache_dir=str(tree.parent))
    cfg.synthcxr.num_studies, cfg.synthcxr.image_size, cfg.synthcxr.seed = 40, 64, 0
    via_source = load_records(cfg, "test")
    via_mimic = load_records(_cfg(source="mimic", root=str(tree)), "test")
    assert [(r.image_path, r.text) for r in via_source] == [
        (r.image_path, r.text) for r in via_mimic
    ]
    records, classes = load_zero_shot_records(cfg)
    assert classes.dtype == np.int32 and list(classes) == [0, 1, 2, 3, 4]
    for r, c in zip(records, classes):
        five = r.labels[[CHEXPERT_CLASSES.index(n) for n in FIVE_CLASSES]]
        assert five[c] == 1.0 and (np.delete(five, c) != 1.0).all()


def test_balanced_five_from_labels(tree):
    test = load_records(_cfg(source="mimic", root=str(tree), frontal_only=False), "test")
    records, names = balanced_five(test, per_class=1)
    assert len(records) == len(names) >= 5
    for r, name in zip(records, names):
        five = {n: r.labels[CHEXPERT_CLASSES.index(n)] for n in FIVE_CLASSES}
        assert five[name] == 1.0 and [n for n, v in five.items() if v in (1.0, -1.0)] == [name]


# ----- bad records ---------------------------------------------------------------------------


@pytest.fixture
def damaged(tree, tmp_path):
    """A copy of the tree with a deleted image, a truncated JPEG and an empty report."""
    root = tmp_path / "damaged"
    shutil.copytree(tree, root)
    records = load_records(_cfg(source="mimic", root=str(root)), "train")
    by_study = {}
    for r in records:
        by_study.setdefault(r.study_id, r)
    victims = list(by_study.values())[3:6]
    Path(victims[0].image_path).unlink()
    data = Path(victims[1].image_path).read_bytes()
    Path(victims[1].image_path).write_bytes(data[: len(data) // 2])
    s = victims[2]
    report = root / f"reports/files/p{s.subject_id[:2]}/p{s.subject_id}/s{s.study_id}.txt"
    report.write_text("  \n")
    bad = [victims[0].image_path, victims[1].image_path, str(report)]
    return root, bad, len(records)


def test_bad_records_skip_reports_each(damaged):
    root, bad, total = damaged
    report = BadRecordReport()
    records = load_records(_cfg(source="mimic", root=str(root)), "train", report)
    assert len(records) == total - 3
    assert [p for p, _ in report.skipped] == bad
    reasons = [r.split(":")[0] for _, r in report.skipped]
    assert reasons == ["missing_image", "corrupt_image", "empty_text"]
    assert report.metrics()["data/skipped"] == 3


def test_bad_records_error_names_first_path(damaged):
    root, bad, _ = damaged
    with pytest.raises(BadRecordError) as info:
        load_records(_cfg(source="mimic", root=str(root), on_bad_record="error"), "train")
    assert info.value.path == bad[0]
    assert bad[0] in str(info.value)


def test_corrupt_data_inside_a_jpeg(tree, tmp_path):
    """Intact markers, garbage inside: 'header' misses it, 'decode' finds it."""
    src = next((tree / "files").rglob("*.jpg"))
    data = bytearray(src.read_bytes())
    data[200:-2] = b"\x00" * (len(data) - 202)
    path = tmp_path / "inside.jpg"
    path.write_bytes(bytes(data))
    assert check_image(str(path), "header") is None
    assert check_image(str(path), "decode").startswith("corrupt_image")


# ----- ROCO and manifests --------------------------------------------------------------------


def _jpegs(tree: Path, n: int) -> list[Path]:
    return sorted((tree / "files").rglob("*.jpg"))[:n]


def test_roco(tree, tmp_path):
    root = tmp_path / "roco"
    images = _jpegs(tree, 4)
    for split in ("train", "validation"):
        folder = root / split / "radiology" / "images"
        folder.mkdir(parents=True)
        for k, img in enumerate(images):
            shutil.copy(img, folder / f"ROCO_{k:05d}.jpg")
    captions = [
        "ROCO_00000\t Chest radiograph showing a left pleural effusion.",
        "ROCO_00001\t ",
        "ROCO_00002\t CT of the abdomen with contrast.",
        "ROCO_00003\t Frontal chest film with clear lungs.",
        "ROCO_00009\t This image file does not exist.",
    ]
    for split in ("train", "validation"):
        (root / split / "radiology" / "captions.txt").write_text("\n".join(captions) + "\n")
    report = BadRecordReport()
    records = load_records(_cfg(source="roco", root=str(root)), "train", report)
    assert [r.study_id for r in records] == ["ROCO_00000", "ROCO_00002", "ROCO_00003"]
    assert records[0].text == "Chest radiograph showing a left pleural effusion."
    assert np.isnan(records[0].labels).all()
    assert [r.split(":")[0] for _, r in report.skipped] == ["empty_text", "missing_image"]
    assert report.skipped[0][0].endswith("captions.txt:2")
    assert len(load_records(_cfg(source="roco", root=str(root)), "validate")) == 3
    with pytest.raises(FileNotFoundError, match="test"):
        load_records(_cfg(source="roco", root=str(root)), "test")
    (root / "train" / "radiology" / "captions.txt").write_text("no tab here\n")
    with pytest.raises(ValueError, match=r"captions.txt line 1"):
        load_records(_cfg(source="roco", root=str(root)), "train")


def _manifest_rows(tree: Path, folder: Path) -> list[dict]:
    images = _jpegs(tree, 4)
    (folder / "img").mkdir(parents=True)
    rows = []
    for k, img in enumerate(images):
        shutil.copy(img, folder / "img" / f"{k}.jpg")
        rows.append(
            dict(
                image=f"img/{k}.jpg",
                text=f"Report number {k} with a small effusion.",
                split="train" if k < 3 else "test",
                view="LATERAL" if k == 2 else "PA",
                Cardiomegaly=["1.0", "", "-1.0", "0.0"][k],
            )
        )
    return rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest(tree, tmp_path, fmt):
    rows = _manifest_rows(tree, tmp_path)
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        for row in rows:  # JSON numbers and nulls for labels
            row["Cardiomegaly"] = float(row["Cardiomegaly"]) if row["Cardiomegaly"] else None
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = BadRecordReport()
    train = load_records(_cfg(source="manifest", root=str(path)), "train", report)
    assert [Path(r.image_path).name for r in train] == ["0.jpg", "1.jpg"]  # 2.jpg is lateral
    assert report.filtered["not_frontal"] == 1
    assert Path(train[0].image_path).is_file() and Path(train[0].image_path).is_absolute()
    k = CHEXPERT_CLASSES.index("Cardiomegaly")
    assert train[0].labels[k] == 1.0 and np.isnan(train[1].labels[k])
    assert np.isnan(np.delete(train[0].labels, k)).all()
    test = load_records(_cfg(source="manifest", root=str(path), frontal_only=False), "test")
    assert len(test) == 1 and test[0].labels[k] == 0.0


def test_manifest_folder_and_errors(tree, tmp_path):
    rows = _manifest_rows(tree, tmp_path)
    with open(tmp_path / "validate.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text"])
        writer.writeheader()
        writer.writerows({"image": r["image"], "text": r["text"]} for r in rows)
        writer.writerow({"image": "img/0.jpg", "text": ""})
    report = BadRecordReport()
    assert len(load_records(_cfg(source="manifest", root=str(tmp_path)), "validate", report)) == 4
    assert report.skipped == [
        (f"{tmp_path / 'validate.csv'} line 6", "empty_text: no caption/report text")
    ]
    (tmp_path / "test.jsonl").write_text('{"image": "img/0.jpg", "caption": "x"}\n')
    with pytest.raises(ValueError, match="'image' and 'text'"):
        load_records(_cfg(source="manifest", root=str(tmp_path)), "test")
    with pytest.raises(FileNotFoundError, match=r"train\.csv or train\.jsonl"):
        load_records(_cfg(source="manifest", root=str(tmp_path)), "train")


def test_config_errors():
    with pytest.raises(ValueError, match=r"data\.source"):
        load_records(_cfg(source="chexpert"), "train")
    with pytest.raises(ValueError, match=r"data\.uncertain_policy"):
        load_records(_cfg(uncertain_policy="maybe"), "train")
    with pytest.raises(ValueError, match=r"data\.root"):
        load_records(_cfg(source="mimic"), "train")


# ----- reports and labels ---------------------------------------------------------------------

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough

 FINDINGS:
 Heart size is normal.  No pleural
 effusion.

 IMPRESSION:  No acute process.
"""


def test_sections():
    parsed = parse_sections(REPORT)
    assert parsed["findings"] == "Heart size is normal. No pleural effusion."
    assert parsed["impression"] == "No acute process."
    assert parsed["indication"] == "___ with cough"
    assert select_text(REPORT, ("impression", "findings")) == "No acute process."
    assert select_text(REPORT, ("findings", "impression"), "concat") == (
        "Heart size is normal. No pleural effusion. No acute process."
    )
    # M-FLAG's released `impression += findings`: no separator.
    assert select_text(REPORT, ("impression", "findings"), "concat", "") == (
        "No acute process.Heart size is normal. No pleural effusion."
    )
    assert (
        select_text("Free text without headers.\n", ("findings",)) == "Free text without headers."
    )
    assert select_text(" INDICATION: cough\n", ("findings",)) == ""
    with pytest.raises(ValueError, match=r"data\.sections"):
        select_text(REPORT, ("history",))
    with pytest.raises(ValueError, match=r"data\.section_mode"):
        select_text(REPORT, ("findings",), "all")


def test_uncertain_policy():
    raw = np.array([1.0, 0.0, -1.0, np.nan], np.float32)
    for policy, labels, mask in [
        ("ones", [1, 0, 1, 0], [1, 1, 1, 0]),
        ("zeros", [1, 0, 0, 0], [1, 1, 1, 0]),
        ("ignore", [1, 0, 0, 0], [1, 1, 0, 0]),
    ]:
        got_labels, got_mask = apply_uncertain_policy(raw, policy)
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_array_equal(got_mask, mask)
        assert got_labels.dtype == got_mask.dtype == np.float32


# ----- DICOM (pydicom's bundled scanner files) -------------------------------------------------


def _sample(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom sample {name} not bundled")
    return path


def test_dicom_ct_rescale_then_minmax():
    path = _sample("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (hu - hu.min()) / (hu.max() - hu.min())
    got = read_dicom(path)
    assert got.shape == (128, 128) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_dicom_mr_window_matches_pydicom():
    path = _sample("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(np.float64)
    by_hand = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # DICOM PS3.3 C.11.2.1.2.1
    from pydicom.pixels import apply_voi_lut

    bits = int(ds.BitsStored)
    lo, hi = (
        (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    )
    by_pydicom = (apply_voi_lut(ds.pixel_array, ds).astype(np.float64) - lo) / (hi - lo)
    got = read_dicom(path)
    np.testing.assert_allclose(got, by_hand, atol=1e-6)
    np.testing.assert_allclose(got, by_pydicom, atol=1e-4)
    assert 0 < (got == 1.0).mean() < 1  # the window clips bright tissue


def test_dicom_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(_sample("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    np.testing.assert_allclose(
        read_dicom(path), 1.0 - read_dicom(_sample("MR_small.dcm")), atol=1e-6
    )


def test_dicom_bad_files(tmp_path, monkeypatch):
    assert check_image(_sample("MR_truncated.dcm"), "decode").startswith("corrupt_image")
    assert check_image(_sample("MR_small.dcm"), "decode") is None
    with pytest.raises(ValueError, match="grayscale"):
        read_dicom(_sample("SC_rgb_small_odd.dcm"))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match="pydicom"):
        read_dicom(_sample("MR_small.dcm"))


def test_dicom_through_a_manifest(tmp_path):
    shutil.copy(_sample("CT_small.dcm"), tmp_path / "ct.dcm")
    (tmp_path / "m.csv").write_text("image,text\nct.dcm,Axial CT slice of the chest.\n")
    records = load_records(_cfg(source="manifest", root=str(tmp_path / "m.csv")), "test")
    assert len(records) == 1 and records[0].image_path.endswith("ct.dcm")
    img = decode(records[0].image_path)
    assert img.mode == "F" and img.size == (128, 128)
    np.testing.assert_allclose(np.asarray(img), read_dicom(tmp_path / "ct.dcm"))
