"""Entry points of the data layer: records of a split and the zero-shot set, by source.

Sources (`data.source`): 'synthcxr' (generated into the cache on first use, then read by
the MIMIC reader), 'mimic', 'roco', 'manifest'. The training split can be cut to a label
fraction (`data.label_fraction`, `data.split_dir`; see `label_fractions`).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from medvlp_jax.data import tables
from medvlp_jax.data.bad_records import BadRecordReport, check_policy
from medvlp_jax.data.config import default_data_config
from medvlp_jax.data.images import IMAGE_CHECKS
from medvlp_jax.data.label_fractions import (
    SPLITS_DIR,
    SYNTHCXR_PERCENTS,
    filter_by_list,
    list_name,
    read_split_list,
    split_list_path,
    write_synthcxr_splits,
)
from medvlp_jax.data.manifest import load_manifest, manifest_path, read_rows
from medvlp_jax.data.mimic import SPLIT, load_mimic, read_csv
from medvlp_jax.data.records import CHEXPERT_CLASSES, FIVE_CLASSES, Record, missing_labels
from medvlp_jax.data.roco import load_roco
from medvlp_jax.data.synthcxr import ZERO_SHOT_CSV, ensure_synthcxr
from medvlp_jax.data.transforms import UNCERTAIN_POLICIES

SOURCES = ("synthcxr", "mimic", "roco", "manifest")
# The class names `load_zero_shot_records`' labels index, for every source (a csv list's
# labels must be among them): the five findings of the balanced 5x200 benchmark.
ZERO_SHOT_CLASSES: tuple[str, ...] = FIVE_CLASSES

log = logging.getLogger(__name__)


def synthcxr_root(data_cfg) -> Path:
    """The SynthCXR tree for `data_cfg.synthcxr`, generated into the cache if needed."""
    s = data_cfg.synthcxr
    return ensure_synthcxr(
        data_cfg.cache_dir, s.num_studies, s.image_size, s.seed, s.zero_shot_per_class
    )


def _validate(data_cfg) -> None:
    if data_cfg.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {data_cfg.source!r}")
    check_policy(data_cfg.on_bad_record)
    tables.check_policy(data_cfg.on_bad_csv)
    if data_cfg.image_check not in IMAGE_CHECKS:
        raise ValueError(
            f"data.image_check must be one of {IMAGE_CHECKS}, got {data_cfg.image_check!r}"
        )
    if data_cfg.uncertain_policy not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"data.uncertain_policy must be one of {UNCERTAIN_POLICIES}, "
            f"got {data_cfg.uncertain_policy!r}"
        )
    if data_cfg.source != "synthcxr" and not data_cfg.root:
        raise ValueError(f"data.root must be set for data.source={data_cfg.source!r}")
    fraction = data_cfg.label_fraction
    if not 0 < fraction <= 1:
        raise ValueError(f"data.label_fraction must be in (0, 1], got {fraction!r}")
    if _uses_label_list(data_cfg) and data_cfg.source == "roco":
        raise ValueError("data.label_fraction/data.split_dir: data.source='roco' has no labels")
    if _uses_label_list(data_cfg) and data_cfg.source != "synthcxr" and not data_cfg.split_dir:
        raise ValueError(
            f"data.label_fraction={fraction} with data.source={data_cfg.source!r} needs "
            "data.split_dir: a folder of train_<percent>.txt lists"
        )


def _uses_label_list(data_cfg) -> bool:
    return data_cfg.label_fraction < 1 or bool(data_cfg.split_dir)


def _load(data_cfg, split: str, report: BadRecordReport, require_text: bool = True) -> list[Record]:
    source = data_cfg.source
    if source == "synthcxr":
        root = synthcxr_root(data_cfg)
        return load_mimic(
            data_cfg,
            split,
            report,
            root=root,
            reports_root=str(root / "reports" / "files"),
            require_text=require_text,
        )
    if source == "mimic":
        return load_mimic(data_cfg, split, report, require_text=require_text)
    if source == "roco":
        return load_roco(data_cfg, split, report)
    return load_manifest(data_cfg, split, report)


def _synthcxr_split_dir(data_cfg) -> Path:
    """`<tree>/splits`, its lists written on first use from the tree's training records as
    the default data config loads them (frontal images), whatever this config filters."""
    root = synthcxr_root(data_cfg)
    folder = root / SPLITS_DIR
    if not all((folder / list_name(p)).is_file() for p in SYNTHCXR_PERCENTS):
        log.info("Writing SynthCXR label-fraction lists into %s", folder)
        train = load_mimic(
            default_data_config(),
            "train",
            BadRecordReport(),
            root=root,
            reports_root=str(root / "reports" / "files"),
        )
        write_synthcxr_splits(train, root, data_cfg.synthcxr.seed)
    return folder


def _label_subset(data_cfg, records: list[Record], report: BadRecordReport) -> list[Record]:
    """The training records listed for data.label_fraction: MIMIC-layout sources match the
    file stem of each line (the dicom_id), manifests the image path as the manifest writes
    it (relative to its folder)."""
    if data_cfg.split_dir:
        folder = Path(data_cfg.split_dir).expanduser()
    else:
        folder = _synthcxr_split_dir(data_cfg)
    path = split_list_path(folder, data_cfg.label_fraction)
    entries = read_split_list(path)
    if data_cfg.source == "manifest":
        manifest = manifest_path(Path(data_cfg.root).expanduser(), "train")
        resolve = lambda image: str(manifest.parent / image)
        listed = [resolve(e) for e in entries]
        record_id = lambda r: r.image_path
        rows = read_rows(manifest).rows
        train_ids = {resolve(r["image"]) for r in rows if r.get("split", "train") == "train"}
    else:
        if data_cfg.source == "synthcxr":
            root = synthcxr_root(data_cfg)
        else:
            root = Path(data_cfg.root).expanduser()
        listed = [Path(e).stem for e in entries]
        record_id = lambda r: Path(r.image_path).stem
        rows = read_csv(root, SPLIT, ("dicom_id", "split")).rows
        train_ids = {r["dicom_id"] for r in rows if r["split"] == "train"}
    return filter_by_list(
        records,
        listed,
        record_id=record_id,
        train_ids=train_ids,
        list_path=path,
        report=report,
    )


def load_records(data_cfg, split: str, report: BadRecordReport | None = None) -> list[Record]:
    """Records of `split` ('train' | 'validate' | 'test') of the configured source.

    Args:
      data_cfg: the `config.data` ConfigDict.
      split: which split.
      report: collects skipped bad records and filter counts (pass one to log its
        `metrics()`); bad records are logged with their paths either way.

    Returns:
      The records, in a deterministic order; for 'train' with data.label_fraction < 1 or
      data.split_dir set, only those in the fraction's list (validate/test: all).

    Raises:
      BadRecordError: with data.on_bad_record='error', at the first bad record.
    """
    _validate(data_cfg)
    report = BadRecordReport() if report is None else report
    records = _load(data_cfg, split, report)
    if split == "train" and _uses_label_list(data_cfg):
        records = _label_subset(data_cfg, records, report)
    log.info("data %s/%s: %d records, %s", data_cfg.source, split, len(records), report.metrics())
    return records


def _from_csv(data_cfg, report: BadRecordReport) -> tuple[list[Record], list[str]]:
    """Zero-shot records listed in data.zero_shot_csv (or SynthCXR's list)."""
    if data_cfg.source == "synthcxr":
        path = synthcxr_root(data_cfg) / ZERO_SHOT_CSV
    else:
        path = Path(data_cfg.zero_shot_csv).expanduser()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "label" not in rows[0]:
        raise ValueError(f"zero-shot list {path}: needs a 'label' column")
    bad = [r["label"] for r in rows if r["label"] not in ZERO_SHOT_CLASSES]
    if bad:
        raise ValueError(
            f"zero-shot list {path}: labels {sorted(set(bad))} not in {ZERO_SHOT_CLASSES}"
        )
    if rows and "dicom_id" in rows[0]:
        if data_cfg.source not in ("synthcxr", "mimic"):
            raise ValueError(f"zero-shot list {path}: 'dicom_id' rows need a MIMIC-layout source")
        by_dicom = {
            Path(r.image_path).stem: r for r in _load(data_cfg, "test", report, require_text=False)
        }
        records, labels = [], []
        for r in rows:
            if r["dicom_id"] in by_dicom:
                records.append(by_dicom[r["dicom_id"]])
                labels.append(r["label"])
            else:
                log.warning(
                    "zero-shot image %s is not a usable test record; left out", r["dicom_id"]
                )
        return records, labels
    if rows and "image" not in rows[0]:
        raise ValueError(f"zero-shot list {path}: needs an 'image' or 'dicom_id' column")
    records = []
    for r in rows:
        image = Path(r["image"])
        image = image if image.is_absolute() else path.parent / image
        labels = missing_labels()
        labels[CHEXPERT_CLASSES.index(r["label"])] = 1.0
        records.append(Record(str(image), str(r.get("text") or ""), labels))
    return records, [r["label"] for r in rows]


def balanced_five(
    records: list[Record], per_class: int, seed: int = 0
) -> tuple[list[Record], list[str]]:
    """A balanced 5-class set: records with exactly one FIVE_CLASSES label = 1 and no other
    of the five positive or uncertain; up to `per_class` per class, sampled by `seed`."""
    idx = [CHEXPERT_CLASSES.index(c) for c in FIVE_CLASSES]
    rng = np.random.default_rng(seed)
    chosen, names = [], []
    for k, name in enumerate(FIVE_CLASSES):
        pool = []
        for r in records:
            five = r.labels[idx]
            if five[k] == 1.0 and not np.isin(np.delete(five, k), (1.0, -1.0)).any():
                pool.append(r)
        if len(pool) < per_class:
            log.warning(
                "zero-shot: only %d test records for %s (wanted %d)", len(pool), name, per_class
            )
        take = sorted(rng.permutation(len(pool))[:per_class])
        chosen += [pool[i] for i in take]
        names += [name] * len(take)
    return chosen, names


def load_zero_shot_records(data_cfg, report: BadRecordReport | None = None):
    """The balanced zero-shot set.

    SynthCXR: its generated list. Other sources: data.zero_shot_csv if set (columns
    `dicom_id` or `image`, and `label`), else a balanced set built from the test split's
    labels (`data.zero_shot_per_class` per class).

    Returns:
      (records, classes) with classes int32 [N], indices into ZERO_SHOT_CLASSES.
    """
    _validate(data_cfg)
    report = BadRecordReport() if report is None else report
    if data_cfg.source == "synthcxr" or data_cfg.zero_shot_csv:
        records, names = _from_csv(data_cfg, report)
    elif data_cfg.source == "roco":
        raise ValueError("data.source='roco' has no labels: set data.zero_shot_csv for zero-shot")
    else:
        test = _load(data_cfg, "test", report, require_text=False)
        records, names = balanced_five(test, data_cfg.zero_shot_per_class)
    classes = np.array([ZERO_SHOT_CLASSES.index(n) for n in names], np.int32)
    return records, classes
