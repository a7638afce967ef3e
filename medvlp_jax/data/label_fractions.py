"""Label-fraction lists: the 1% / 10% / 100% training subsets of downstream fine-tuning.

A list is a text file `train_<percent>.txt` with one image identifier per line (blank lines
and lines starting with '#' are ignored), the format of BenchX's split files
(yangzhou12/BenchX, `preprocess/datasets/*/train_1.txt`, `train_10.txt`; its full list is
`train.txt`, read here for 100% when `train_100.txt` is absent).

SynthCXR's lists are generated (`write_synthcxr_splits`): prefixes of one order of the
training images, so the 1% list is inside the 10% list, which is inside the 100% list.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np

from medvlp_jax.data.bad_records import BadRecordReport
from medvlp_jax.data.records import CHEXPERT_CLASSES, Record

# The folder of the generated lists inside a SynthCXR tree, and their percentages.
SPLITS_DIR = "splits"
SYNTHCXR_PERCENTS = (1, 10, 100)
# `BadRecordReport.filtered` reasons: training records left out because they are not
# listed, and listed images that are not loaded records (bad or filtered out).
NOT_LISTED = "not_in_label_list"
LISTED_NOT_LOADED = "listed_not_loaded"

log = logging.getLogger(__name__)


def list_name(percent: float) -> str:
    """'train_<percent>.txt': train_1.txt for 1, train_0.5.txt for 0.5."""
    return f"train_{round(percent, 6):g}.txt"


def _image_id(record: Record) -> str:
    return Path(record.image_path).stem


def _order(records: Sequence[Record], seed: int) -> tuple[list[str], int]:
    """Image ids in list order, and how many coverage picks lead it.

    The order is a `seed` permutation of the sorted ids, except that it starts with, for
    each CheXpert class positive in some record (in class order), the first image of the
    permutation positive for it, unless an earlier pick already is.
    """
    by_id = {_image_id(r): r for r in records}
    ids = sorted(by_id)
    perm = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    positive = {i: by_id[i].labels == 1.0 for i in ids}
    picks: list[str] = []
    for k in range(len(CHEXPERT_CLASSES)):
        if not any(positive[i][k] for i in picks):
            first = next((i for i in perm if positive[i][k]), None)
            if first is not None:
                picks.append(first)
    chosen = set(picks)
    return picks + [i for i in perm if i not in chosen], len(picks)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_synthcxr_splits(train_records: Sequence[Record], root: Path, seed: int = 0) -> Path:
    """Writes `<root>/splits/train_{1,10,100}.txt` from SynthCXR's training records.

    Each list is a prefix of one order of the image ids (the image file stems): a `seed`
    permutation of the sorted ids, led by one pick per CheXpert class with a positive
    record (the first image of the permutation positive for it, unless an earlier pick
    is). So the lists are nested and depend only on the set of records, not their order.
    The list for p percent of N images holds max(ceil(p * N / 100), number of picks) ids,
    at least 1: the 1% list has a positive of every class positive in training (it is
    longer than 1% when N < 100 x the picks, i.e. for small trees).
    Each file is written to a temporary file and renamed, so concurrent writers (which
    write the same bytes) never leave a partial list.

    Args:
      train_records: the training records (any order; one per image).
      root: the SynthCXR tree.
      seed: the permutation seed.

    Returns:
      The folder of the lists.
    """
    if not train_records:
        raise ValueError(f"SynthCXR {root}: no training records to write label lists from")
    order, picks = _order(train_records, seed)
    folder = Path(root) / SPLITS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for percent in SYNTHCXR_PERCENTS:
        size = max(-(-percent * len(order) // 100), picks)
        _write_atomically(folder / list_name(percent), "".join(i + "\n" for i in order[:size]))
    return folder


def split_list_path(split_dir: Path, fraction: float) -> Path:
    """The list file for `fraction` in `split_dir`: train_<100 * fraction>.txt (for 1.0,
    BenchX's train.txt when train_100.txt is absent)."""
    path = split_dir / list_name(100 * fraction)
    if path.is_file():
        return path
    if fraction == 1.0 and (split_dir / "train.txt").is_file():
        return split_dir / "train.txt"
    have = sorted(p.name for p in split_dir.glob("train*.txt"))
    raise FileNotFoundError(
        f"label list {path} not found (from data.label_fraction={fraction} and "
        f"data.split_dir={str(split_dir)!r}); that folder has {have or 'no train_*.txt lists'}"
    )


def read_split_list(path: Path) -> list[str]:
    """The identifiers of a list file, in file order (blank and '#' lines skipped)."""
    lines = (s.strip() for s in Path(path).read_text(encoding="utf-8-sig").splitlines())
    ids = [s for s in lines if s and not s.startswith("#")]
    if not ids:
        raise ValueError(f"label list {path} lists no images")
    return ids


def filter_by_list(
    records: Sequence[Record],
    listed: Sequence[str],
    *,
    record_id: Callable[[Record], str],
    train_ids: Collection[str],
    list_path: Path,
    report: BadRecordReport,
) -> list[Record]:
    """The records whose id is listed, in `records` order.

    Args:
      records: the loaded training records.
      listed: the list's identifiers, in the form `record_id` gives.
      record_id: a record's identifier.
      train_ids: the identifiers of every training image of the source, loaded or not.
      list_path: the list file (for messages).
      report: counts the records left out (`NOT_LISTED`) and the listed images that are
        not loaded records (`LISTED_NOT_LOADED`; logged once with the count).

    Raises:
      ValueError: a listed identifier is not a training image of the source.
    """
    foreign = list(dict.fromkeys(i for i in listed if i not in train_ids))
    if foreign:
        raise ValueError(
            f"label list {list_path}: {len(foreign)} listed ids are not training images of "
            f"this data source (first: {', '.join(foreign[:5])}); is it a list for another "
            "dataset or split?"
        )
    wanted = set(listed)
    kept = [r for r in records if record_id(r) in wanted]
    missing = len(wanted - {record_id(r) for r in kept})
    report.filtered[NOT_LISTED] += len(records) - len(kept)
    if missing:
        report.filtered[LISTED_NOT_LOADED] += missing
        log.warning(
            "label list %s: %d listed images are not usable training records (bad or "
            "filtered out); training on the other %d",
            list_path,
            missing,
            len(kept),
        )
    return kept
