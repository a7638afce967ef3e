"""ROCO-style caption folders: `<root>/<split>/radiology/{captions.txt, images/ID.jpg}`.

`captions.txt` holds one `ID<TAB>caption` line per image (ROCO writes a space after the
tab); an ID listed twice is a table problem (`tables`, policy `data.on_bad_csv`). The
'validate' split reads the folder `validation` (ROCO's name), else `validate`.
"""

from __future__ import annotations

from pathlib import Path

from medvlp_jax.data import tables
from medvlp_jax.data.bad_records import BadRecordReport, check_pair
from medvlp_jax.data.records import Record, missing_labels

_SPLIT_DIRS = {
    "train": ("train",),
    "validate": ("validation", "validate", "val"),
    "test": ("test",),
}
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _split_dir(root: Path, split: str) -> Path:
    if split not in _SPLIT_DIRS:
        raise ValueError(f"ROCO split must be one of {tuple(_SPLIT_DIRS)}, got {split!r}")
    for name in _SPLIT_DIRS[split]:
        path = root / name / "radiology"
        if (path / "captions.txt").exists():
            return path
    tried = [str(root / n / "radiology" / "captions.txt") for n in _SPLIT_DIRS[split]]
    raise FileNotFoundError(f"ROCO: no captions file for split {split!r}; tried {tried}")


def read_captions(path: Path) -> tables.Table:
    """`captions.txt` as a table of `id` and `caption` (whitespace collapsed)."""
    rows, lines = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{path} line {n}: expected 'ID<TAB>caption', got {line[:80]!r}")
        image_id, caption = line.split("\t", 1)
        rows.append({"id": image_id.strip(), "caption": " ".join(caption.split())})
        lines.append(n)
    return tables.Table(path, ("id", "caption"), rows, lines)


def load_roco(data_cfg, split: str, report: BadRecordReport) -> list[Record]:
    """Records of one ROCO split in caption-file order (labels all NaN, no view)."""
    root = Path(data_cfg.root).expanduser()
    folder = _split_dir(root, split)
    captions = folder / "captions.txt"
    table = tables.unique_rows(read_captions(captions), ("id",), data_cfg.on_bad_csv)
    out = []
    for row, n in zip(table.rows, table.lines, strict=True):
        image_id, text = row["id"], row["caption"]
        image = next(
            (
                folder / "images" / f"{image_id}{e}"
                for e in _IMAGE_EXTS
                if (folder / "images" / f"{image_id}{e}").exists()
            ),
            folder / "images" / f"{image_id}.jpg",
        )
        if check_pair(data_cfg, report, str(image), text, f"{captions}:{n}"):
            out.append(Record(str(image), text, missing_labels(), study_id=image_id))
    return out
