"""Image files: cheap load-time checks and decoding to PIL images for the pipeline."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from medvlp_jax.data.dicom import read_dicom

IMAGE_CHECKS = ("header", "decode")
_JPEG_EXT = (".jpg", ".jpeg")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_dicom(path: str) -> bool:
    return path.lower().endswith((".dcm", ".dicom"))


def _check_header(path: str, size: int) -> str | None:
    """Magic bytes and end markers: finds missing, empty, truncated JPEG/PNG files."""
    with open(path, "rb") as f:
        head = f.read(132)
        f.seek(max(size - 64, 0))
        tail = f.read().rstrip(b"\x00\r\n ")
    lower = path.lower()
    if lower.endswith(_JPEG_EXT):
        if not head.startswith(b"\xff\xd8"):
            return "corrupt_image: not a JPEG (no SOI marker)"
        if not tail.endswith(b"\xff\xd9"):
            return "corrupt_image: JPEG end marker missing (truncated file?)"
    elif lower.endswith(".png"):
        if not head.startswith(_PNG_SIGNATURE):
            return "corrupt_image: not a PNG (bad signature)"
        if b"IEND" not in tail[-12:]:
            return "corrupt_image: PNG IEND chunk missing (truncated file?)"
    elif is_dicom(path) and len(head) >= 132 and head[128:132] != b"DICM":
        return "corrupt_image: no DICM prefix"
    return None


def check_image(path: str, mode: str = "header") -> str | None:
    """Returns why the image at `path` is unusable, or None if it looks fine.

    mode 'header' reads a few bytes (existence, magic bytes, JPEG/PNG end markers);
    'decode' decodes the whole image once (finds corruption inside the data too).
    """
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"data.image_check must be one of {IMAGE_CHECKS}, got {mode!r}")
    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing_image: file not found"
    if size == 0:
        return "corrupt_image: empty file"
    reason = _check_header(path, size)
    if reason is None and mode == "decode":
        try:
            decode(path)
        except Exception as e:
            return f"corrupt_image: {type(e).__name__}: {e}"
    return reason


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def decode(path: str, color: bool = False, min_size: int = 0) -> Image.Image:
    """Decodes an image file to a PIL image, grayscale unless asked to keep colour.

    Args:
      path: JPEG / PNG / any PIL format, or DICOM (.dcm / .dicom).
      color: keep colour sources as 'RGB' (grayscale sources stay grayscale either way).
      min_size: if > 0, JPEGs may be decoded at a reduced DCT scale as long as both sides
        stay >= min_size (much faster for large radiographs).

    Returns:
      A loaded PIL image: 'L' (8-bit), 'F' (DICOM and 16/32-bit sources, values in [0, 1]),
      or 'RGB' (colour sources when `color`).
    """
    if is_dicom(path):
        return Image.fromarray(read_dicom(path), "F")
    with Image.open(path) as img:
        keep_color = color and img.mode not in _GRAY_MODES
        if min_size > 0 and img.format == "JPEG":
            img.draft("RGB" if keep_color else "L", (min_size, min_size))
        img.load()
        if keep_color:
            return img.convert("RGB")
        if img.mode.startswith("I"):  # 16/32-bit grayscale: scale to [0, 1]
            arr = np.asarray(img, np.float32)
            top = 65535.0 if img.mode.startswith("I;16") else max(65535.0, float(arr.max()))
            return Image.fromarray(arr / top, "F")
        if img.mode == "F":
            return img.copy()
        return img.convert("L")
