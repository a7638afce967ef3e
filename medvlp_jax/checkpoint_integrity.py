"""Checksums of saved checkpoint steps, and the check that a step is whole before a restore.

Orbax does not verify what it reads back: flipped bytes in a TensorStore chunk restore as
wrong values, and a truncated or missing file fails deep inside TensorStore. So, once a step
is on disk, `write_manifest` records the size and SHA-256 of every file in its folder in
`checksums.json` (inside the step folder, written atomically), and `problems` compares the
folder with it before any restore.

A step without `checksums.json` (written before checksums existed, or killed between Orbax's
commit and the manifest) is checked for what every complete step holds: the commit and state
metadata, non-empty readable JSON files and a non-empty data iterator state.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "checksums.json"
# What every committed step folder holds, whatever wrote it.
REQUIRED = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA")


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: Path) -> None:
    """Writes `step_dir/checksums.json`: `{relative path: {"size", "sha256"}}` of its files."""
    entries = {
        str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(step_dir)
    }
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": entries}, indent=1, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)


def has_manifest(step_dir: Path) -> bool:
    return (step_dir / MANIFEST).is_file()


def problems(step_dir: Path) -> list[str]:
    """What is wrong with the step folder, one line per file (none when it is whole): against
    its checksums when it has them, else against what every committed step holds."""
    if not step_dir.is_dir():
        return [f"{step_dir}: missing"]
    if has_manifest(step_dir):
        return _against_manifest(step_dir)
    return _structural(step_dir)


def _against_manifest(step_dir: Path) -> list[str]:
    try:
        entries = json.loads((step_dir / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{step_dir / MANIFEST}: unreadable ({e})"]
    found = []
    for rel, want in sorted(entries.items()):
        path = step_dir / rel
        if not path.is_file():
            found.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            found.append(f"{path}: {path.stat().st_size} bytes, {want['size']} when saved")
        elif _sha256(path) != want["sha256"]:
            found.append(f"{path}: contents changed since it was saved (SHA-256 mismatch)")
    return found


def _structural(step_dir: Path) -> list[str]:
    found = [f"{step_dir / rel}: missing" for rel in REQUIRED if not (step_dir / rel).is_file()]
    for rel in _JSON_FILES:
        path = step_dir / rel
        if path.is_file() and not _is_json(path):
            found.append(f"{path}: not valid JSON (truncated?)")
    data = sorted((step_dir / "data").glob("*.json"))
    for path in data:
        if not _is_json(path):
            found.append(f"{path}: not valid JSON (the data iterator state is truncated?)")
    if (step_dir / "data").is_dir() and not data:
        found.append(f"{step_dir / 'data'}: holds no iterator state")
    return found


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return True
