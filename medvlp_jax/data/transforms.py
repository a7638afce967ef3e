"""Per-example grain transforms: image decode + geometry + normalisation, text and labels.

Elements entering the transforms are dicts {'index': int, 'record': Record} (eval adds
'valid'); they leave as dicts of numpy arrays. All randomness comes from the generator grain
passes to `RandomMap.random_map` (seeded per example), so a pipeline is a function of its seed.

`Example` makes one element's fields; `Guard` runs it under `data.on_bad_record`: a record
that fails (`BadRecordError`: an image that does not decode, a hook's missing file) stops the
pipeline ('error') or is replaced by the next record that works ('skip'), marked in the field
`BAD_FIELD` (and, in evaluation, with `valid` False).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

from medvlp_jax.data.bad_records import BAD_FIELD, BadRecordError, check_policy, reason_code
from medvlp_jax.data.images import decode
from medvlp_jax.data.records import Record
from medvlp_jax.data.reports import split_sentences
from medvlp_jax.data.tokenize import TextEncoder

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
# Fields every element has besides `Features`'; hooks may not return them.
RESERVED_FIELDS = ("image", "index", "valid", BAD_FIELD)
# How many following records `Guard` tries in place of a bad one before it gives up.
MAX_REPLACEMENTS = 32

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Output geometry, normalisation and augmentation of images."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    degrees: tuple[float, float] = (0.0, 0.0)  # counter-clockwise, as torchvision
    translate: float = 0.0
    hflip: bool = False

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            value = tuple(getattr(self, name))
            if len(value) not in (1, self.channels):
                raise ValueError(f"data.{name} must have 1 or {self.channels} values, got {value}")
        if min(self.std) <= 0:
            raise ValueError(f"data.std must be > 0, got {self.std}")

    @classmethod
    def from_config(cls, data_cfg, augment: bool) -> ImageSpec:
        a = data_cfg.augment
        return cls(
            image_size=data_cfg.image_size,
            channels=data_cfg.channels,
            mean=tuple(data_cfg.mean),
            std=tuple(data_cfg.std),
            augment=augment and a.enabled,
            crop_scale=tuple(a.random_resized_crop_scale),
            crop_ratio=tuple(a.random_resized_crop_ratio),
            degrees=rotation_range(a.affine_degrees),
            translate=a.affine_translate,
            hflip=a.hflip,
        )

    @property
    def decode_size(self) -> int:
        """Smallest source side that keeps the smallest crop >= image_size (JPEG draft)."""
        if not self.augment:
            return self.image_size
        side = math.sqrt(self.crop_scale[0] * min(self.crop_ratio[0], 1 / self.crop_ratio[1]))
        return math.ceil(self.image_size / min(side, 1.0))


def rotation_range(degrees) -> tuple[float, float]:
    """`data.augment.affine_degrees` -> (lo, hi) degrees, counter-clockwise positive as
    torchvision's RandomRotation (a number d, as run configs before the pair held, is +-d)."""
    if isinstance(degrees, int | float):
        return (-float(degrees), float(degrees))
    lo, hi = (float(d) for d in degrees)
    if lo > hi:
        raise ValueError(f"data.augment.affine_degrees={tuple(degrees)}: expected lo <= hi")
    return lo, hi


def center_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centred square (x0, y0, x1, y1)."""
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def random_resized_box(width, height, scale, ratio, rng: np.random.Generator):
    """A random crop box (x0, y0, x1, y1) of area fraction in `scale` and aspect in `ratio`
    (log-uniform); falls back to the centre square after 10 tries."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return x0, y0, x0 + w, y0 + h
    return center_box(width, height)


def _to_array(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """PIL image -> normalised float32 [S, S, C] (grayscale repeated to C channels).

    Geometry runs on the single-channel image; channels are repeated only here.
    """
    arr = np.asarray(img, np.float32)
    if img.mode != "F":
        arr = arr / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    out = (arr - mean) / std
    shape = (spec.image_size, spec.image_size, spec.channels)
    return np.broadcast_to(out, shape)  # a view; batching copies it


def load_image(path: str, spec: ImageSpec, rng: np.random.Generator | None) -> np.ndarray:
    """Decodes, crops/resizes (and augments when `rng` is given) one image.

    Returns:
      float32 [S, S, C], normalised.

    Raises:
      BadRecordError: the file cannot be decoded (names the path).
    """
    try:
        img = decode(path, spec.channels == 3, spec.decode_size)
    except FileNotFoundError as e:
        raise BadRecordError(path, "missing_image: file not found") from e
    except Exception as e:
        raise BadRecordError(
            path,
            f"corrupt_image: {type(e).__name__}: {e} (data.image_check='decode' finds "
            "such files when records are loaded)",
        ) from e
    size = (spec.image_size, spec.image_size)
    if rng is None or not spec.augment:
        return _to_array(
            img.resize(size, Image.Resampling.BILINEAR, box=center_box(*img.size)), spec
        )
    return _to_array(_augment(img, spec, rng), spec)


def _augment(img: Image.Image, spec: ImageSpec, rng: np.random.Generator) -> Image.Image:
    """Random resized crop, rotation, translation and flip as one affine resampling.

    Output pixel (u, v) reads the input at box_centre + diag(sx, sy) F R (u - h - t) with
    h the output centre, t the translation, R the rotation, F the optional flip and (sx, sy)
    the crop-box scale. Crops more than 2x larger than the output are first resized with
    antialiasing.
    """
    s = spec.image_size
    x0, y0, x1, y1 = random_resized_box(*img.size, spec.crop_scale, spec.crop_ratio, rng)
    # The angle below turns the image clockwise on screen (y down): hence the sign flip.
    angle = np.deg2rad(rng.uniform(-spec.degrees[1], -spec.degrees[0]))
    tx, ty = rng.uniform(-spec.translate, spec.translate, size=2) * s
    flip = -1.0 if spec.hflip and rng.random() < 0.5 else 1.0
    sx, sy = (x1 - x0) / s, (y1 - y0) / s
    if max(sx, sy) > 2.0:
        img = img.resize((s, s), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1))
        x0, y0, x1, y1, sx, sy = 0.0, 0.0, float(s), float(s), 1.0, 1.0
    c, si = float(np.cos(angle)), float(np.sin(angle))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    h = s / 2
    data = (
        sx * flip * c,
        sx * flip * si,
        cx - sx * flip * (c * (h + tx) + si * (h + ty)),
        -sy * si,
        sy * c,
        cy - sy * (c * (h + ty) - si * (h + tx)),
    )
    return img.transform(
        (s, s), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=0
    )


def random_sentence(record: Record, rng: np.random.Generator) -> Record:
    """The record with its text replaced by one of its sentences, uniformly (`data.train_text=
    'random_sentence'`); seeded per example, so each epoch draws again. A text of one
    sentence or none stays as it is."""
    sentences = split_sentences(record.text)
    if len(sentences) < 2:
        return record
    return dataclasses.replace(record, text=sentences[rng.integers(len(sentences))])


def apply_uncertain_policy(labels: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw CheXpert labels [..., 14] (1/0/-1/NaN) -> (labels, label_mask) float32.

    'ones': -1 -> 1; 'zeros': -1 -> 0; 'ignore': -1 -> 0 with mask 0. NaN -> 0, mask 0.
    """
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"data.uncertain_policy must be one of {UNCERTAIN_POLICIES}, got {policy!r}"
        )
    labels = np.asarray(labels, np.float32)
    missing = np.isnan(labels)
    uncertain = labels == -1.0
    mask = ~missing & ~(uncertain & (policy == "ignore"))
    out = np.where(missing, 0.0, labels)
    out = np.where(uncertain, 1.0 if policy == "ones" else 0.0, out)
    return out.astype(np.float32), mask.astype(np.float32)


class Features:
    """A record -> text tokens, labels, label mask and hook fields.

    Hooks are `hook(record) -> dict[str, np.ndarray]` with fixed shapes; a field name that
    is already taken (or one of RESERVED_FIELDS) is an error.
    """

    def __init__(self, tokenizer, max_len: int, uncertain_policy: str, hooks=()):
        apply_uncertain_policy(np.zeros(1), uncertain_policy)  # validates the policy
        self.encoder = TextEncoder(tokenizer, max_len)
        self.uncertain_policy = uncertain_policy
        self.hooks = tuple(hooks)

    def __call__(self, record: Record) -> dict:
        """input_ids, attention_mask int32 [T]; labels, label_mask float32 [14]; hook fields."""
        ids, mask = self.encoder([record.text])
        labels, label_mask = apply_uncertain_policy(record.labels, self.uncertain_policy)
        out = dict(input_ids=ids[0], attention_mask=mask[0], labels=labels, label_mask=label_mask)
        for hook in self.hooks:
            for key, value in hook(record).items():
                if key in out or key in RESERVED_FIELDS:
                    raise ValueError(f"data hook {hook!r} returned field {key!r}, which is taken")
                out[key] = np.asarray(value)
        return out


@dataclasses.dataclass(frozen=True)
class Example:
    """A record -> the fields of its batch row: image float32 [S, S, C] and `Features`.

    Attributes:
      spec: the image geometry; augmented when `spec.augment` and an rng is given.
      features: text, labels and hook fields.
      random_sentence: draw one sentence of the text (`data.train_text='random_sentence'`).
    """

    spec: ImageSpec
    features: Features
    random_sentence: bool = False

    def __call__(self, record: Record, rng: np.random.Generator | None) -> dict:
        image = load_image(record.image_path, self.spec, rng)
        if self.random_sentence:
            record = random_sentence(record, rng)
        return {"image": image, **self.features(record)}


class Guard:
    """Makes an element's fields with `example`, under `data.on_bad_record`.

    A record that raises BadRecordError stops the pipeline (policy 'error', naming its path)
    or ('skip') is replaced by the next record of `records` that works (index + 1, + 2, ...,
    at most MAX_REPLACEMENTS; deterministic, so a resumed run sees the same batches). Its
    path is logged once. The output's BAD_FIELD holds the failure's reason code (0 = none).
    Training elements (no 'valid' field) take the replacement's 'index'; evaluation elements
    keep their own and get 'valid' False, so the failed record is left out of the metrics
    (padding, already invalid, is not counted again).

    Args:
      example: the record -> fields function.
      records: every record the elements index (replacements come from them).
      policy: `data.on_bad_record`.
    """

    def __init__(self, example: Example, records: Sequence[Record], policy: str):
        check_policy(policy)
        self.example = example
        self.records = records
        self.policy = policy
        self._warned: set[str] = set()

    def __call__(self, element: dict, rng: np.random.Generator | None) -> dict:
        """{'index', 'record'[, 'valid']} -> {'index' int32, 'image', ..., BAD_FIELD int32
        [, 'valid' bool]}."""
        index, valid = element["index"], element.get("valid")
        bad = 0
        try:
            fields = self.example(element["record"], rng)
        except BadRecordError as e:
            if self.policy == "error":
                raise
            training = valid is None
            self._warn(e, training)
            used, fields = self._replacement(index, e, rng, training)
            bad = reason_code(e.reason) if training or valid else 0
            index, valid = (used, None) if training else (index, False)
        out = {"index": np.int32(index), **fields, BAD_FIELD: np.int32(bad)}
        if valid is not None:
            out["valid"] = np.bool_(valid)
        return out

    def _replacement(self, index: int, error: BadRecordError, rng, training: bool):
        """(index, fields) of the first record after `index` that works."""
        tries = min(MAX_REPLACEMENTS, len(self.records) - 1)
        for step in range(1, tries + 1):
            other = (index + step) % len(self.records)
            try:
                return other, self.example(self.records[other], rng)
            except BadRecordError as e:
                self._warn(e, training)
        raise BadRecordError(
            error.path,
            f"{error.reason}; no record can stand in for it: the {tries} records after it "
            "fail too (data.on_bad_record='skip'); check the data folder",
        )

    def _warn(self, error: BadRecordError, training: bool) -> None:
        """Logs a bad record's path and reason, once per path."""
        if error.path in self._warned:
            return
        self._warned.add(error.path)
        action = "replaced by the next good record" if training else "left out of the evaluation"
        log.warning(
            "Bad record %s: %s; %s (data.on_bad_record='skip')", error.path, error.reason, action
        )


class GuardedMap(grain.transforms.Map):
    """`Guard` as a deterministic grain map (evaluation without augmentation)."""

    def __init__(self, guard: Guard):
        self.guard = guard

    def map(self, element: dict) -> dict:
        return self.guard(element, None)


class GuardedRandomMap(grain.transforms.RandomMap):
    """`Guard` as a seeded grain map (training, augmented evaluation)."""

    def __init__(self, guard: Guard):
        self.guard = guard

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return self.guard(element, rng)
