"""Per-example grain transforms: image decode + geometry + normalisation, text and labels.

Elements entering the transforms are dicts {'index': int, 'record': Record} (eval adds
'valid'); they leave as dicts of numpy arrays. All randomness comes from the generator grain
passes to `RandomMap.random_map` (seeded per example), so a pipeline is a function of its seed.
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np
from PIL import Image

from medvlp_jax.data.bad_records import BadRecordError
from medvlp_jax.data.images import decode
from medvlp_jax.data.reports import split_sentences
from medvlp_jax.data.tokenize import TextEncoder

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")


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


class TrainImage(grain.transforms.RandomMap):
    """Adds 'image' float32 [S, S, C]: random resized crop, small affine, optional flip."""

    def __init__(self, spec: ImageSpec):
        self.spec = spec

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return {**element, "image": load_image(element["record"].image_path, self.spec, rng)}


class RandomSentence(grain.transforms.RandomMap):
    """Replaces the record's text by one of its sentences, uniformly (`data.train_text=
    'random_sentence'`); seeded per example, so each epoch draws again. A text of one
    sentence or none stays as it is."""

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        record = element["record"]
        sentences = split_sentences(record.text)
        if len(sentences) < 2:
            return element
        text = sentences[rng.integers(len(sentences))]
        return {**element, "record": dataclasses.replace(record, text=text)}


class EvalImage(grain.transforms.Map):
    """Adds 'image' float32 [S, S, C]: centre square crop resized to S (deterministic)."""

    def __init__(self, spec: ImageSpec):
        self.spec = spec

    def map(self, element: dict) -> dict:
        return {**element, "image": load_image(element["record"].image_path, self.spec, None)}


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


class Features(grain.transforms.Map):
    """Replaces 'record' by text tokens, labels, label mask, index and hook fields.

    Hooks are `hook(record) -> dict[str, np.ndarray]` with fixed shapes; a field name that
    is already taken is an error.
    """

    def __init__(self, tokenizer, max_len: int, uncertain_policy: str, hooks=()):
        apply_uncertain_policy(np.zeros(1), uncertain_policy)  # validates the policy
        self.encoder = TextEncoder(tokenizer, max_len)
        self.uncertain_policy = uncertain_policy
        self.hooks = tuple(hooks)

    def map(self, element: dict) -> dict:
        record = element["record"]
        ids, mask = self.encoder([record.text])
        labels, label_mask = apply_uncertain_policy(record.labels, self.uncertain_policy)
        out = {k: v for k, v in element.items() if k != "record"}
        out.update(
            input_ids=ids[0],
            attention_mask=mask[0],
            labels=labels,
            label_mask=label_mask,
            index=np.int32(element["index"]),
        )
        for hook in self.hooks:
            for key, value in hook(record).items():
                if key in out:
                    raise ValueError(f"data hook {hook!r} returned field {key!r}, which is taken")
                out[key] = np.asarray(value)
        return out
