"""Dense downstream targets as data hooks (`hook(record) -> fields`, see `data.pipeline`):
segmentation masks and CenterNet detection targets, in the geometry of the evaluation image
(the centred square crop resized to `data.image_size`, as `data.transforms.load_image` makes
it without augmentation). Geometric augmentation would move the image but not these targets,
so dense tasks run with `data.augment.enabled=False` (checked by the downstream method).

Masks: `<image stem><mask_suffix>` beside the image, a uint16 PNG whose bit k marks
`CHEXPERT_CLASSES[k]` (SynthCXR writes them so; convert other datasets' masks to it).
Boxes: a csv with `dicom_id` (the image file stem) or `image` (its path), `finding` (a
CheXpert class name) and `x0, y0, x1, y1` in pixels of the original image (SynthCXR's
`mimic-cxr-synth-boxes.csv`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from medvlp_jax.data.bad_records import BadRecordError
from medvlp_jax.data.records import CHEXPERT_CLASSES, Record
from medvlp_jax.data.transforms import center_box

# CenterNet's minimum IoU a box of Gaussian-radius corner error still has with the truth.
MIN_OVERLAP = 0.7


def _crop_geometry(path: str, image_size: int) -> tuple[float, float, float]:
    """(x0, y0, scale) mapping original pixels to network-input pixels: (x - x0) * scale."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as e:
        raise BadRecordError(path, f"corrupt_image: unreadable image header: {e}") from e
    x0, y0, x1, _ = center_box(width, height)
    return x0, y0, image_size / (x1 - x0)


class MaskTargets:
    """record -> {'masks': uint8 `[S, S, C]`} for `classes` (nearest-neighbour resize)."""

    def __init__(self, classes: Sequence[str], image_size: int, suffix: str = "_mask.png"):
        self.bits = [CHEXPERT_CLASSES.index(c) for c in classes]
        self.image_size = image_size
        self.suffix = suffix

    def __call__(self, record: Record) -> dict[str, np.ndarray]:
        image = Path(record.image_path)
        path = image.with_name(image.stem + self.suffix)
        try:
            with Image.open(path) as img:
                bits = np.asarray(img, np.int64)
        except Exception as e:
            raise BadRecordError(str(path), f"missing_mask: missing or unreadable mask: {e}") from e
        h, w = bits.shape
        box = center_box(w, h)
        side = self.image_size
        planes = []
        for k in self.bits:
            plane = Image.fromarray(((bits >> k) & 1).astype(np.uint8))
            planes.append(np.asarray(plane.resize((side, side), Image.Resampling.NEAREST, box=box)))
        return {"masks": np.stack(planes, axis=-1).astype(np.uint8)}

    def __repr__(self) -> str:
        return f"MaskTargets(bits={self.bits}, size={self.image_size}, suffix={self.suffix!r})"


def read_boxes(path: str, classes: Sequence[str]) -> dict[str, list[tuple]]:
    """The boxes csv -> {image key (dicom_id or image path): [(class index, x0, y0, x1, y1)]}
    for the findings in `classes` (other rows are left out)."""
    out: dict[str, list[tuple]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        key = "dicom_id" if "dicom_id" in (reader.fieldnames or ()) else "image"
        needed = {key, "finding", "x0", "y0", "x1", "y1"}
        if not needed <= set(reader.fieldnames or ()):
            raise ValueError(f"boxes csv {path}: needs columns {sorted(needed)}")
        for row in reader:
            if row["finding"] in classes:
                box = tuple(float(row[k]) for k in ("x0", "y0", "x1", "y1"))
                out.setdefault(row[key], []).append((classes.index(row["finding"]), *box))
    return out


def _smaller_root(a: float, b: float, c: float) -> float:
    """The smaller real root of a r^2 + b r + c = 0 (a > 0, real roots)."""
    return (-b - math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)


def gaussian_radius(height: float, width: float, min_overlap: float = MIN_OVERLAP) -> float:
    """The CornerNet / CenterNet Gaussian radius: the largest r such that a box whose corners
    move by r still has IoU >= `min_overlap` with the truth, the tightest of three moves: both
    corners shifted the same way, both inward (shrunk) and both outward (grown), each the
    boundary root of its quadratic in r (tested: at the radius the tightest move has IoU
    exactly `min_overlap`)."""
    h, w, o = height, width, min_overlap
    shifted = _smaller_root(1.0, -(h + w), h * w * (1 - o) / (1 + o))
    shrunk = _smaller_root(4.0, -2 * (h + w), (1 - o) * h * w)
    grown = -_smaller_root(4 * o, -2 * o * (h + w), (o - 1) * h * w)  # the positive root
    return min(shifted, shrunk, grown)


def draw_gaussian(heatmap: np.ndarray, cx: int, cy: int, radius: int) -> None:
    """Max-blends exp(-d^2 / (2 sigma^2)), sigma = (2 radius + 1) / 6, centred on (cx, cy)
    into `heatmap` [h, w] in place (the centre cell gets exactly 1)."""
    sigma = (2 * radius + 1) / 6
    ys, xs = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    g = np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma))
    h, w = heatmap.shape
    x0, x1 = max(cx - radius, 0), min(cx + radius + 1, w)
    y0, y1 = max(cy - radius, 0), min(cy + radius + 1, h)
    patch = g[y0 - cy + radius : y1 - cy + radius, x0 - cx + radius : x1 - cx + radius]
    np.maximum(heatmap[y0:y1, x0:x1], patch, out=heatmap[y0:y1, x0:x1])


class BoxTargets:
    """record -> CenterNet targets at stride `out_stride` and the boxes themselves:
    `heatmap` float32 `[h, w, C]`, `size` / `offset` float32 `[h, w, 2]` (in output cells),
    `center_mask` float32 `[h, w]`, `boxes` float32 `[max_boxes, 4]` (network-input pixels),
    `box_classes` int32 `[max_boxes]`, `box_valid` bool `[max_boxes]` (h = w = S / stride).
    A record with more than `max_boxes` boxes is an error naming the field."""

    def __init__(
        self,
        boxes: dict[str, list[tuple]],
        num_classes: int,
        image_size: int,
        out_stride: int,
        max_boxes: int,
    ):
        self.boxes = boxes
        self.num_classes = num_classes
        self.image_size = image_size
        self.out_stride = out_stride
        self.max_boxes = max_boxes

    def _boxes_of(self, record: Record) -> list[tuple]:
        path = Path(record.image_path)
        return self.boxes.get(path.stem, self.boxes.get(record.image_path, []))

    def __call__(self, record: Record) -> dict[str, np.ndarray]:
        rows = self._boxes_of(record)
        if len(rows) > self.max_boxes:
            raise ValueError(
                f"{record.image_path} has {len(rows)} boxes; raise downstream.max_boxes "
                f"(now {self.max_boxes})"
            )
        side = self.image_size // self.out_stride
        heat = np.zeros((self.num_classes, side, side), np.float32)
        size = np.zeros((side, side, 2), np.float32)
        offset = np.zeros((side, side, 2), np.float32)
        center = np.zeros((side, side), np.float32)
        boxes = np.zeros((self.max_boxes, 4), np.float32)
        classes = np.zeros(self.max_boxes, np.int32)
        valid = np.zeros(self.max_boxes, bool)
        if rows:
            x0, y0, scale = _crop_geometry(record.image_path, self.image_size)
        for i, (c, bx0, by0, bx1, by1) in enumerate(rows):
            box = np.clip(
                np.array([bx0 - x0, by0 - y0, bx1 - x0, by1 - y0]) * scale, 0, self.image_size
            )
            boxes[i], classes[i], valid[i] = box, c, True
            cell = box / self.out_stride
            w, h = cell[2] - cell[0], cell[3] - cell[1]
            if w <= 0 or h <= 0:
                continue
            cx, cy = (cell[0] + cell[2]) / 2, (cell[1] + cell[3]) / 2
            ix, iy = min(int(cx), side - 1), min(int(cy), side - 1)
            radius = max(0, int(gaussian_radius(h, w)))
            draw_gaussian(heat[c], ix, iy, radius)
            size[iy, ix] = (w, h)
            offset[iy, ix] = (cx - ix, cy - iy)
            center[iy, ix] = 1.0
        return {
            "heatmap": np.moveaxis(heat, 0, -1),
            "size": size,
            "offset": offset,
            "center_mask": center,
            "boxes": boxes,
            "box_classes": classes,
            "box_valid": valid,
        }

    def __repr__(self) -> str:
        return (
            f"BoxTargets({len(self.boxes)} images, C={self.num_classes}, S={self.image_size}, "
            f"stride={self.out_stride}, max_boxes={self.max_boxes})"
        )
