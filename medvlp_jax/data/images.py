"""Image files: cheap load-time checks and decoding to PIL images for the pipeline."""

from __future__ import annotations

import os

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


def decode(path: str, mode: str = "L", min_size: int = 0) -> Image.Image:
    """Decodes an image file to a PIL image.

    Args:
      path: JPEG / PNG / any PIL format, or DICOM (.dcm: float 'F' image in [0, 1]).
      mode: 'L' (grayscale) or 'RGB' for PIL formats (grayscale sources are repeated).
      min_size: if > 0, JPEGs may be decoded at a reduced DCT scale as long as both sides
        stay >= min_size (much faster for large radiographs).

    Returns:
      A loaded PIL image ('L', 'RGB' or 'F').
    """
    if is_dicom(path):
        return Image.fromarray(read_dicom(path), "F")
    with Image.open(path) as img:
        if min_size > 0 and img.format == "JPEG":
            img.draft(mode, (min_size, min_size))
        img.load()
        return img.convert(mode) if img.mode != mode else img.copy()
