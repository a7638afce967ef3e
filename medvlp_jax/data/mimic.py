"""MIMIC-CXR-JPG reader: images + reports + CheXpert labels + official split.

Expects under `root`: `files/pNN/pSUBJECT/sSTUDY/DICOM.jpg` and the csv files
`mimic-cxr-2.0.0-{metadata,chexpert,split}.csv` (or `.csv.gz` as distributed). Reports
(`pNN/pSUBJECT/sSTUDY.txt`) come from the MIMIC-CXR reports archive.

The csv files are checked as they are read (`tables`, policy `data.on_bad_csv`): every
CheXpert label column present, one split row per dicom_id with a known split, one metadata
row per dicom_id with a known ViewPosition, one label row per (subject_id, study_id).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvlp_jax.data import tables
from medvlp_jax.data.bad_records import BadRecordReport
from medvlp_jax.data.images import check_image
from medvlp_jax.data.records import (
    CHEXPERT_CLASSES,
    FRONTAL_VIEWS,
    KNOWN_VIEWS,
    Record,
    missing_labels,
)
from medvlp_jax.data.reports import select_text

SPLITS = ("train", "validate", "test")
METADATA = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"


def read_csv(root: Path, name: str, required: tuple[str, ...]) -> tables.Table:
    """The table `root/name` (or `name.gz`); the `required` (id) columns must be there."""
    path = root / name
    if not path.exists() and (root / f"{name}.gz").exists():
        path = root / f"{name}.gz"
    if not path.exists():
        raise FileNotFoundError(f"MIMIC-CXR: {root / name} not found (data.root={root})")
    table = tables.read_csv_table(path)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; has {list(table.columns)}")
    return table


def read_splits(root: Path, policy: str) -> tables.Table:
    """The split table, checked: known split values, one row per dicom_id."""
    table = read_csv(root, SPLIT, ("dicom_id", "study_id", "subject_id", "split"))
    tables.check_values(table, "split", SPLITS, policy)
    return tables.unique_rows(table, ("dicom_id",), policy)


def read_views(root: Path, policy: str) -> dict[str, str]:
    """dicom_id -> ViewPosition, checked: known views, one row per dicom_id."""
    table = read_csv(root, METADATA, ("dicom_id", "ViewPosition"))
    tables.check_values(table, "ViewPosition", KNOWN_VIEWS, policy)
    table = tables.unique_rows(table, ("dicom_id",), policy)
    return {r["dicom_id"]: r["ViewPosition"] or "" for r in table.rows}


def read_labels(root: Path, policy: str) -> dict[tuple[str, str], np.ndarray]:
    """(subject_id, study_id) -> float32 [14] raw CheXpert labels, checked: every label
    column present, one row per study."""
    table = read_csv(root, CHEXPERT, ("subject_id", "study_id"))
    tables.check_columns(table, CHEXPERT_CLASSES, policy, "CheXpert label")
    table = tables.unique_rows(table, ("subject_id", "study_id"), policy)
    labels = {}
    for row, line in zip(table.rows, table.lines, strict=True):
        where = f"{table.path} line {line}"
        labels[(row["subject_id"], row["study_id"])] = np.array(
            [parse_label(row.get(c), where) for c in CHEXPERT_CLASSES], np.float32
        )
    return labels


def parse_label(value: str | None, where: str) -> float:
    """'1.0' / '0.0' / '-1.0' / '' -> 1, 0, -1, NaN."""
    if value is None or value.strip() == "":
        return float("nan")
    try:
        out = float(value)
    except ValueError:
        raise ValueError(f"{where}: label value {value!r} is not a number") from None
    if out not in (1.0, 0.0, -1.0) and not np.isnan(out):
        raise ValueError(f"{where}: label value {value!r} is not one of 1, 0, -1, empty")
    return out


def find_reports_root(root: Path, reports_root: str = "") -> Path:
    """The folder with pNN/pSUBJECT/sSTUDY.txt reports (see config `reports_root`)."""
    if reports_root:
        path = Path(reports_root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data.reports_root={reports_root} is not a folder")
        return path
    candidates = [root / "reports" / "files", root / "mimic-cxr-reports" / "files", root / "files"]
    for path in candidates:
        if path.is_dir() and any(path.glob("p*/p*/s*.txt")):
            return path
    raise FileNotFoundError(
        f"MIMIC-CXR: no reports found in {[str(c) for c in candidates]}; set data.reports_root"
    )


def image_path(root: Path, subject: str, study: str, dicom: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"


def load_mimic(
    data_cfg,
    split: str,
    report: BadRecordReport,
    *,
    root: Path | None = None,
    reports_root: str | None = None,
    require_text: bool = True,
) -> list[Record]:
    """Records of one split, one per image, sorted by (subject, study, dicom).

    Args:
      data_cfg: uses root, reports_root, frontal_only, sections, section_mode,
        section_separator, min_text_words, on_bad_record, image_check, on_bad_csv.
      split: 'train' | 'validate' | 'test'.
      report: collects skipped and filtered records.
      root, reports_root: override the config (SynthCXR passes its cache folder).
      require_text: apply the text checks (False for image-only uses, e.g. zero-shot).
    """
    if split not in SPLITS:
        raise ValueError(f"MIMIC-CXR split must be one of {SPLITS}, got {split!r}")
    root = Path(root if root is not None else data_cfg.root).expanduser()
    if not str(root) or not root.is_dir():
        raise FileNotFoundError(f"MIMIC-CXR: data.root={str(root)!r} is not a folder")
    reports = find_reports_root(
        root, data_cfg.reports_root if reports_root is None else reports_root
    )
    splits = read_splits(root, data_cfg.on_bad_csv)
    views = read_views(root, data_cfg.on_bad_csv)
    labels = read_labels(root, data_cfg.on_bad_csv)
    rows = sorted(
        (r for r in splits.rows if r["split"] == split),
        key=lambda r: (r["subject_id"], r["study_id"], r["dicom_id"]),
    )
    texts: dict[str, str | None] = {}
    out = []
    policy = data_cfg.on_bad_record
    for r in rows:
        subject, study, dicom = r["subject_id"], r["study_id"], r["dicom_id"]
        view = views.get(dicom, "")
        if data_cfg.frontal_only and view not in FRONTAL_VIEWS:
            report.filter("not_frontal")
            continue
        path = str(image_path(root, subject, study, dicom))
        text = ""
        if require_text:
            rpath = reports / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
            if study not in texts:
                texts[study] = rpath.read_text(errors="replace") if rpath.exists() else None
            raw = texts[study]
            if raw is None:
                report.bad(policy, str(rpath), "missing_report: file not found")
                continue
            if not raw.strip():
                report.bad(policy, str(rpath), "empty_text: report is empty")
                continue
            text = select_text(
                raw, data_cfg.sections, data_cfg.section_mode, data_cfg.section_separator
            )
            if not text:
                report.filter("no_section")
                continue
            if len(text.split()) < data_cfg.min_text_words:
                report.filter("short_text")
                continue
        reason = check_image(path, data_cfg.image_check)
        if reason is not None:
            report.bad(policy, path, reason)
            continue
        out.append(
            Record(
                image_path=path,
                text=text,
                labels=labels.get((subject, study), missing_labels()),
                study_id=study,
                subject_id=subject,
                view=view,
            )
        )
    return out
