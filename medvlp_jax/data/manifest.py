"""Generic manifests: CSV or JSONL rows `image, text[, split, view, <CheXpert class>...]`.

`image` paths are relative to the manifest's folder (absolute paths are kept). Label
columns named like CHEXPERT_CLASSES hold 1 / 0 / -1 / empty. `data.root` is a manifest
file (with a `split` column to select rows; without one every row belongs to every split)
or a folder with `train`, `validate` and `test` manifests (`.csv` or `.jsonl`).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from medvlp_jax.data.bad_records import BadRecordReport, check_pair
from medvlp_jax.data.mimic import parse_label
from medvlp_jax.data.records import CHEXPERT_CLASSES, FRONTAL_VIEWS, Record

log = logging.getLogger(__name__)
_EXTS = (".csv", ".jsonl")


def manifest_path(root: Path, split: str) -> Path:
    """The manifest file for `split` under `root` (a file, or a folder of split files)."""
    if root.is_file():
        return root
    for ext in _EXTS:
        if (root / f"{split}{ext}").exists():
            return root / f"{split}{ext}"
    raise FileNotFoundError(f"manifest: no {split}.csv or {split}.jsonl in data.root={root}")


def read_rows(path: Path) -> list[dict]:
    """Rows of a CSV (header line) or JSONL (one object per line) manifest."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: invalid JSON ({e})") from None
        return rows
    raise ValueError(f"manifest {path}: expected a .csv or .jsonl file")


def _label(value, where: str) -> float:
    if value is None or isinstance(value, str):
        return parse_label(value, where)
    return parse_label(str(float(value)), where)


def load_manifest(data_cfg, split: str, report: BadRecordReport) -> list[Record]:
    """Records of one split in manifest order."""
    path = manifest_path(Path(data_cfg.root).expanduser(), split)
    rows = read_rows(path)
    if rows and ("image" not in rows[0] or "text" not in rows[0]):
        raise ValueError(f"manifest {path}: needs 'image' and 'text' fields, has {sorted(rows[0])}")
    if path == Path(data_cfg.root).expanduser() and rows and "split" not in rows[0]:
        log.warning(
            "manifest %s has no 'split' column: all %d rows used for %r", path, len(rows), split
        )
    out = []
    for n, row in enumerate(rows, start=2 if path.suffix == ".csv" else 1):
        where = f"{path} line {n}"
        if "split" in row and row["split"] != split:
            continue
        view = str(row.get("view") or "")
        if data_cfg.frontal_only and view and view not in FRONTAL_VIEWS:
            report.filter("not_frontal")
            continue
        if not row.get("image"):
            raise ValueError(f"{where}: empty 'image' field")
        image = Path(row["image"])
        image = image if image.is_absolute() else path.parent / image
        text = " ".join(str(row.get("text") or "").split())
        if not check_pair(data_cfg, report, str(image), text, where):
            continue
        labels = np.array([_label(row.get(c), where) for c in CHEXPERT_CLASSES], np.float32)
        out.append(
            Record(
                str(image),
                text,
                labels,
                study_id=str(row.get("study_id") or ""),
                subject_id=str(row.get("subject_id") or ""),
                view=view,
            )
        )
    return out
