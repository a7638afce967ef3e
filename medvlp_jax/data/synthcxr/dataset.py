"""Writes a SynthCXR tree in the MIMIC-CXR-JPG layout, deterministically for a seed.

Layout under the root:
  files/pNN/pSUBJECT/sSTUDY/DICOMID.jpg        8-bit grayscale JPEG (quality 95)
  files/pNN/pSUBJECT/sSTUDY/DICOMID_mask.png   uint16 PNG, bit k = CHEXPERT_CLASSES[k] region
  reports/files/pNN/pSUBJECT/sSTUDY.txt        the report (FINDINGS / IMPRESSION sections)
  mimic-cxr-2.0.0-metadata.csv, -chexpert.csv, -split.csv   as in MIMIC-CXR-JPG 2.0.0
  mimic-cxr-synth-boxes.csv                    dicom_id, finding, location, x0, y0, x1, y1
  mimic-cxr-synth-5x200.csv                    dicom_id, study_id, subject_id, label
  synthcxr.json                                generator version and parameters (written last)

Study k draws everything from `np.random.default_rng([seed, k])`; the subject/split plan
from `np.random.default_rng([seed, 2**32 - 1])`. No timestamps are written, so two runs
with the same arguments give byte-identical trees, whatever the number of workers.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import datetime
import fcntl
import json
import logging
import math
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from medvlp_jax.data.config import resolve_cache_dir
from medvlp_jax.data.records import CHEXPERT_CLASSES, FIVE_CLASSES
from medvlp_jax.data.synthcxr.findings import sample_study, study_labels
from medvlp_jax.data.synthcxr.render import render_image
from medvlp_jax.data.synthcxr.report import write_report

GENERATOR_VERSION = 1
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
BOXES_CSV = "mimic-cxr-synth-boxes.csv"
ZERO_SHOT_CSV = "mimic-cxr-synth-5x200.csv"
INFO_JSON = "synthcxr.json"
TEST_FRACTION, VALIDATE_FRACTION = 0.2, 0.05

METADATA_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
CHEXPERT_COLUMNS = ("subject_id", "study_id", *sorted(CHEXPERT_CLASSES))
_VIEW_MEANING = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
}
_BASE_DATE = datetime.date(2110, 1, 1)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """Identity of study `index`: ids, split, forced zero-shot class (or None)."""

    index: int
    subject_id: int
    study_id: int
    split: str
    forced: str | None
    day: int  # days after the subject's first study


def default_zero_shot_per_class(num_studies: int) -> int:
    """Zero-shot studies per class that `num_studies` always provides: num_studies // 50,
    at least 1 from 25 studies on (the test split holds 20%), at most 200."""
    return min(200, max(num_studies // 50, 1 if num_studies >= 25 else 0))


def plan_studies(num_studies: int, seed: int, zero_shot_per_class: int) -> list[StudyPlan]:
    """Subjects (1-3 studies each), subject-level splits, forced classes in the test split."""
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies}")
    rng = np.random.default_rng([seed, 2**32 - 1])
    counts = []
    while sum(counts) < num_studies:
        counts.append(int(rng.choice(3, p=(0.5, 0.3, 0.2))) + 1)
    counts[-1] -= sum(counts) - num_studies
    subjects = np.sort(rng.choice(10_000_000, size=len(counts), replace=False)) + 10_000_000
    study_ids = rng.choice(10_000_000, size=num_studies, replace=False) + 50_000_000
    quota = {
        "test": math.ceil(TEST_FRACTION * num_studies),
        "validate": math.ceil(VALIDATE_FRACTION * num_studies),
    }
    split_of = {}
    taken = {"test": 0, "validate": 0}
    for k in rng.permutation(len(counts)):
        split = next((s for s in ("test", "validate") if taken[s] < quota[s]), "train")
        split_of[k] = split
        if split != "train":
            taken[split] += counts[k]
    plans, index = [], 0
    need = 5 * zero_shot_per_class
    for k, (subject, count) in enumerate(zip(subjects, counts)):
        ids = np.sort(study_ids[index : index + count])
        for j, study in enumerate(ids):
            forced = None
            if split_of[k] == "test" and need > 0:
                forced = FIVE_CLASSES[(5 * zero_shot_per_class - need) % 5]
                need -= 1
            plans.append(StudyPlan(index, int(subject), int(study), split_of[k], forced, 30 * j))
            index += 1
    if need > 0:
        raise ValueError(
            f"SynthCXR: {num_studies} studies give {taken['test']} test studies, fewer than "
            f"5 x zero_shot_per_class = {5 * zero_shot_per_class}; raise num_studies or lower "
            "zero_shot_per_class"
        )
    return plans


def study_dir(subject_id: int, study_id: int) -> str:
    """'files/pNN/pSUBJECT/sSTUDY' (MIMIC layout; NN = first two digits of the subject)."""
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}"


def report_path(subject_id: int, study_id: int) -> str:
    s = str(subject_id)
    return f"reports/files/p{s[:2]}/p{s}/s{study_id}.txt"


def _fmt_label(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.1f}"


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5))


def write_study(plan: StudyPlan, root: str, image_size: int, seed: int) -> dict:
    """Renders and writes one study; returns its csv rows."""
    rng = np.random.default_rng([seed, plan.index])
    spec = sample_study(rng, plan.forced)
    labels = study_labels(spec)
    report = write_report(spec, rng)
    folder = Path(root, study_dir(plan.subject_id, plan.study_id))
    folder.mkdir(parents=True, exist_ok=True)
    rpath = Path(root, report_path(plan.subject_id, plan.study_id))
    rpath.parent.mkdir(parents=True, exist_ok=True)
    rpath.write_text(report)
    date = (_BASE_DATE + datetime.timedelta(days=plan.subject_id % 3000 + plan.day)).strftime(
        "%Y%m%d"
    )
    desc = "CHEST (PORTABLE AP)" if spec.views[0] == "AP" else "CHEST (PA AND LAT)"
    rows = {"metadata": [], "split": [], "boxes": [], "zero_shot": []}
    for n, view in enumerate(spec.views):
        dicom = _dicom_id(rng)
        img = render_image(spec, view, image_size, rng)
        Image.fromarray(img.image, "L").save(folder / f"{dicom}.jpg", "JPEG", quality=95)
        Image.fromarray(img.masks).save(folder / f"{dicom}_mask.png", "PNG", compress_level=6)
        time = f"{8 + plan.index % 10:02d}{(7 * plan.index) % 60:02d}{n:02d}.000"
        rows["metadata"].append(
            (
                dicom,
                plan.subject_id,
                plan.study_id,
                desc,
                view,
                image_size,
                image_size,
                date,
                time,
                "CHEST (PA AND LAT)" if view != "AP" else desc,
                _VIEW_MEANING[view],
                "Recumbent" if view == "AP" else "Erect",
            )
        )
        rows["split"].append((dicom, plan.study_id, plan.subject_id, plan.split))
        rows["boxes"].extend((dicom, *box) for box in img.boxes)
        if n == 0 and plan.forced is not None:
            rows["zero_shot"].append((dicom, plan.study_id, plan.subject_id, plan.forced))
    by_name = dict(zip(CHEXPERT_CLASSES, labels))
    rows["chexpert"] = [
        (plan.subject_id, plan.study_id, *(_fmt_label(by_name[c]) for c in CHEXPERT_COLUMNS[2:]))
    ]
    return rows


def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_study_star(args):
    return write_study(*args)


def generate(
    out_dir,
    num_studies: int,
    image_size: int,
    seed: int,
    zero_shot_per_class: int | None = None,
    workers: int = 1,
) -> Path:
    """Writes a SynthCXR tree into `out_dir` (created; must not hold a tree already).

    Args:
      out_dir: the folder to write (its parent must exist or is created).
      num_studies: number of studies (each 1 frontal image, 30% also a lateral one).
      image_size: side of the square images, pixels.
      seed: the dataset seed.
      zero_shot_per_class: N of the 5 x N zero-shot list (None or 0: default_zero_shot_per_class).
      workers: processes rendering studies (the output does not depend on it).

    Returns:
      The root path.
    """
    zs = zero_shot_per_class or default_zero_shot_per_class(num_studies)
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    plans = plan_studies(num_studies, seed, zs)
    root = Path(out_dir)
    if (root / INFO_JSON).exists():
        raise FileExistsError(f"{root} already holds a SynthCXR tree")
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(p, str(root), image_size, seed) for p in plans]
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(
                pool.map(_write_study_star, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
            )
    else:
        results = [write_study(*job) for job in jobs]
    merged = {k: [row for r in results for row in r[k]] for k in results[0]}
    _write_csv(root / METADATA_CSV, METADATA_COLUMNS, merged["metadata"])
    _write_csv(root / CHEXPERT_CSV, CHEXPERT_COLUMNS, merged["chexpert"])
    _write_csv(root / SPLIT_CSV, ("dicom_id", "study_id", "subject_id", "split"), merged["split"])
    _write_csv(
        root / BOXES_CSV,
        ("dicom_id", "finding", "location", "x0", "y0", "x1", "y1"),
        merged["boxes"],
    )
    zero_shot = sorted(merged["zero_shot"], key=lambda r: (FIVE_CLASSES.index(r[3]), r[0]))
    _write_csv(root / ZERO_SHOT_CSV, ("dicom_id", "study_id", "subject_id", "label"), zero_shot)
    splits = {s: sum(p.split == s for p in plans) for s in ("train", "validate", "test")}
    info = dict(
        generator="SynthCXR",
        version=GENERATOR_VERSION,
        num_studies=num_studies,
        image_size=image_size,
        seed=seed,
        zero_shot_per_class=zs,
        num_images=len(merged["metadata"]),
        studies_per_split=splits,
    )
    (root / INFO_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return root


def tree_name(
    num_studies: int, image_size: int, seed: int, zero_shot_per_class: int | None = None
) -> str:
    """'synthcxr-n{N}-s{S}-seed{K}' (+ '-zs{Z}' for a non-default zero-shot size)."""
    name = f"synthcxr-n{num_studies}-s{image_size}-seed{seed}"
    if zero_shot_per_class and zero_shot_per_class != default_zero_shot_per_class(num_studies):
        name += f"-zs{zero_shot_per_class}"
    return name


def _is_current(root: Path) -> bool:
    try:
        return json.loads((root / INFO_JSON).read_text()).get("version") == GENERATOR_VERSION
    except (OSError, ValueError):
        return False


def ensure_synthcxr(
    cache_dir,
    num_studies: int,
    image_size: int,
    seed: int,
    zero_shot_per_class: int | None = None,
    workers: int | None = None,
) -> Path:
    """The SynthCXR tree `<cache_dir>/synthcxr-n{N}-s{S}-seed{K}`, generated on first use.

    Generation writes a temporary sibling folder and renames it into place, so an
    interrupted run never leaves a partial tree. Concurrent callers (several processes of
    one job) take turns on a lock file: one generates, the others then find the tree. A
    tree of an older generator version is replaced. `cache_dir` '' means $MEDVLP_JAX_CACHE
    or ~/.cache/medvlp_jax.
    """
    base = resolve_cache_dir(str(cache_dir) if cache_dir else "")
    root = base / tree_name(num_studies, image_size, seed, zero_shot_per_class)
    if _is_current(root):
        return root
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_current(root):
            _generate_atomically(
                base, root, num_studies, image_size, seed, zero_shot_per_class, workers
            )
    return root


def _generate_atomically(base, root, num_studies, image_size, seed, zero_shot_per_class, workers):
    tmp = base / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if num_studies >= 1000 else 1
    log.info(
        "Generating SynthCXR (%d studies, %d px, seed %d) into %s",
        num_studies,
        image_size,
        seed,
        root,
    )
    try:
        generate(tmp, num_studies, image_size, seed, zero_shot_per_class, workers=workers)
        if root.exists() and not _is_current(root):
            stale = base / f".{root.name}.stale-{uuid.uuid4().hex[:8]}"
            os.rename(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_current(root):  # another process won the race with a complete tree
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_masks(path) -> dict[str, np.ndarray]:
    """Finding masks of one image: {CheXpert class: bool [S, S]} for the classes present."""
    bits = np.asarray(Image.open(path), dtype=np.int64)
    return {
        name: (bits >> k) & 1 == 1
        for k, name in enumerate(CHEXPERT_CLASSES)
        if ((bits >> k) & 1).any()
    }
