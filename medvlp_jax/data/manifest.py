"""Generic manifests: CSV or JSONL rows `image, text[, split, view, <CheXpert class>...]`.

`image` paths are relative to the manifest's folder (absolute paths are kept). Label
columns named like CHEXPERT_CLASSES hold 1 / 0 / -1 / empty. `data.root` is a manifest
file (with a `split` column to select rows; without one every row belongs to every split)
or a folder with `train`, `validate` and `test` manifests (`.csv` or `.jsonl`).

Checked as it is read (`tables`, policy `data.on_bad_csv`): no column that is a CheXpert
class spelled otherwise ('pleural_effusion': it would be ignored), `split` one of train /
validate / test, `view` a known view (`records.KNOWN_VIEWS`), and an image listed again only
with another text (several captions of one image are fine; the same image with another split,
labels or view is a conflict).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medvlp_jax.data import tables
from medvlp_jax.data.bad_records import BadRecordReport, check_pair
from medvlp_jax.data.mimic import SPLITS, parse_label
from medvlp_jax.data.records import CHEXPERT_CLASSES, FRONTAL_VIEWS, KNOWN_VIEWS, Record

log = logging.getLogger(__name__)
_EXTS = (".csv", ".jsonl")


def _spelling(name: str) -> str:
    """'Pleural_Effusion', ' pleural effusion' -> 'pleuraleffusion'."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


_SPELLINGS = {_spelling(c): c for c in CHEXPERT_CLASSES}


def manifest_path(root: Path, split: str) -> Path:
    """The manifest file for `split` under `root` (a file, or a folder of split files)."""
    if root.is_file():
        return root
    for ext in _EXTS:
        if (root / f"{split}{ext}").exists():
            return root / f"{split}{ext}"
    raise FileNotFoundError(f"manifest: no {split}.csv or {split}.jsonl in data.root={root}")


def read_rows(path: Path) -> tables.Table:
    """A CSV (header line) or JSONL (one object per line; its columns: every key, in the
    order they first appear) manifest."""
    if path.suffix == ".csv":
        return tables.read_csv_table(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"manifest {path}: expected a .csv or .jsonl file")
    rows, lines = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON ({e})") from None
            lines.append(n)
    columns = tuple(dict.fromkeys(k for row in rows for k in row))
    return tables.Table(path, columns, rows, lines)


def check_manifest(table: tables.Table, policy: str) -> tables.Table:
    """The manifest checked (see module doc), repeated rows dropped under 'warn'."""
    if table.rows and ("image" not in table.columns or "text" not in table.columns):
        raise ValueError(
            f"manifest {table.path}: needs 'image' and 'text' fields, has {list(table.columns)}"
        )
    misspelt = [
        f"{table.path}: column {column!r} is not read as the CheXpert label {_SPELLINGS[key]!r}"
        " (label columns are spelled as records.CHEXPERT_CLASSES)"
        for column in table.columns
        if (key := _spelling(column)) in _SPELLINGS and column != _SPELLINGS[key]
    ]
    tables.report(policy, misspelt, "leave those columns out (labels unknown)")
    tables.check_values(table, "split", SPLITS, policy)
    tables.check_values(table, "view", KNOWN_VIEWS, policy)
    return tables.unique_rows(table, ("image",), policy, may_differ=("text",))


def _label(value, where: str) -> float:
    if value is None or isinstance(value, str):
        return parse_label(value, where)
    return parse_label(str(float(value)), where)


def load_manifest(data_cfg, split: str, report: BadRecordReport) -> list[Record]:
    """Records of one split in manifest order."""
    path = manifest_path(Path(data_cfg.root).expanduser(), split)
    table = check_manifest(read_rows(path), data_cfg.on_bad_csv)
    if path == Path(data_cfg.root).expanduser() and table.rows and "split" not in table.columns:
        log.warning(
            "manifest %s has no 'split' column: all %d rows used for %r",
            path,
            len(table.rows),
            split,
        )
    out = []
    for row, n in zip(table.rows, table.lines, strict=True):
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
