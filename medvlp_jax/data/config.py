"""Defaults of the data layer (`config.data`), and the cache directory rule."""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

CACHE_ENV = "MEDVLP_JAX_CACHE"


def default_data_config() -> ml_collections.ConfigDict:
    """Returns the data-layer options with their defaults (merged as `config.data`)."""
    c = ml_collections.ConfigDict()
    # Where records come from: 'synthcxr' | 'mimic' | 'roco' | 'manifest'.
    c.source = "synthcxr"
    # mimic: the MIMIC-CXR-JPG folder (holding files/ and the csv files);
    # roco: the folder holding train/validation/test; manifest: a .csv/.jsonl file, or a folder
    # with train/validate/test.{csv,jsonl}.
    c.root = ""
    # mimic: folder holding pNN/pSUBJECT/sSTUDY.txt; '' = <root>/reports/files, else
    # <root>/mimic-cxr-reports/files, else <root>/files (whichever exists).
    c.reports_root = ""
    # '' = $MEDVLP_JAX_CACHE, else ~/.cache/medvlp_jax.
    c.cache_dir = ""

    c.synthcxr = ml_collections.ConfigDict()
    c.synthcxr.num_studies = 2000
    c.synthcxr.image_size = 128
    c.synthcxr.seed = 0
    # Studies per class in the generated zero-shot list (5 x N from the test split, which
    # holds 20% of the studies); 0 = auto: num_studies // 50, at least 1 from 25 studies on,
    # at most 200 (40 for the default 2000 studies).
    c.synthcxr.zero_shot_per_class = 0

    # Label fraction: the share of the training split used (downstream fine-tuning reports
    # 0.01 / 0.1 / 1.0). < 1 or a split_dir set keeps only the training records listed in
    # <split_dir>/train_<100 * fraction>.txt (0.05 -> train_5.txt; 1.0 -> train_100.txt,
    # else BenchX's train.txt), one image per line (MIMIC layout: the dicom_id / file stem;
    # manifest: the image path as the manifest writes it). Validation and test stay whole.
    c.label_fraction = 1.0
    # The folder of those lists; '' = for synthcxr <tree>/splits (train_1, train_10 and
    # train_100.txt, generated on first use); other sources need it when label_fraction < 1.
    c.split_dir = ""

    # Zero-shot list for real sources: a csv (dicom_id or image column + label column with a
    # FIVE_CLASSES name); '' = build a balanced list from the test split's labels.
    c.zero_shot_csv = ""
    c.zero_shot_per_class = 200

    # Text: sections in order of preference; 'first' = the first non-empty one,
    # 'concat' = all non-empty ones joined in this order, with `section_separator` between
    # them (M-FLAG's released code appends the findings to the impression with no space).
    c.sections = ("findings", "impression")
    c.section_mode = "first"
    c.section_separator = " "
    # A training example's text: 'report' (the selected sections) | 'random_sentence' (one
    # of their sentences, drawn per example and epoch; evaluation keeps the whole text).
    c.train_text = "report"
    c.min_text_words = 3
    c.frontal_only = True
    # Uncertain (-1) CheXpert labels: 'ones' | 'zeros' | 'ignore' (label_mask 0).
    c.uncertain_policy = "ignore"
    # Bad records (missing/corrupt image, empty report): 'skip' (counted and logged with the
    # path; an image that only fails to decode in the pipeline is replaced by the next good
    # record in training and left out of an evaluation) | 'error' (stop, naming the path).
    c.on_bad_record = "skip"
    # Load-time image check: 'header' (exists, magic bytes, JPEG/PNG end marker; cheap) |
    # 'decode' (full decode of every image once; slow on large sets).
    c.image_check = "header"
    # Broken tables (a missing CheXpert label column, a duplicate or conflicting id row, an
    # unknown split or view value): 'error' (stop, naming file, line, column and value) |
    # 'warn' (log it; keep the first row of an id, read a missing label column as unknown).
    c.on_bad_csv = "error"

    # Images.
    c.image_size = 224
    c.channels = 3
    c.mean = (0.5,)
    c.std = (0.5,)
    # Training augmentation (one affine resampling per image): random resized crop (area
    # fraction, aspect range), rotation by a uniform angle in (lo, hi) degrees (counter-
    # clockwise positive, as torchvision), translation in +-fraction of the side.
    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = True
    c.augment.random_resized_crop_scale = (0.8, 1.0)
    c.augment.random_resized_crop_ratio = (3 / 4, 4 / 3)
    c.augment.affine_degrees = (-5.0, 5.0)
    c.augment.affine_translate = 0.02
    # Off by default: a flip swaps the patient's left and right that the report names.
    c.augment.hflip = False

    # Text tokens: a local Hugging Face tokenizer folder ('' = the embedded MiniLM one).
    c.tokenizer = ""
    c.max_text_len = 64

    # Batching: global batch sizes (per process = size // process_count).
    c.batch_size = 32
    c.eval_batch_size = 64
    # Worker processes (grain mp_prefetch; 0 = the main process with `prefetch` threads).
    c.num_workers = 0
    # Batches prepared ahead (threads with 0 workers, else each worker's buffer).
    c.prefetch = 2
    # Seed of eval_batches(augment=True); training order comes from train_iterator's `seed`.
    c.shuffle_seed = 0
    return c


def resolve_cache_dir(cache_dir: str = "") -> Path:
    """The cache folder: `cache_dir` if given, else $MEDVLP_JAX_CACHE, else ~/.cache/medvlp_jax."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "medvlp_jax"
