"""DICOM pixels -> display values in [0, 1] (modality LUT, VOI LUT / window, MONOCHROME1).

pydicom is imported lazily, so the rest of the data layer works without it.
"""

from __future__ import annotations

import numpy as np


def _pydicom():
    try:
        import pydicom
        from pydicom import pixels
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading .dcm images needs pydicom (pip install pydicom); it is not installed"
        ) from e
    return pydicom, pixels


def _first(value) -> float:
    """First value of a possibly multi-valued DICOM number (WindowCenter may hold several)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) of modality values into [0, 1]."""
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function != "LINEAR":
        raise ValueError(f"unknown VOILUTFunction {function!r}")
    if width < 1:
        raise ValueError(f"LINEAR window width must be >= 1, got {width}")
    return np.clip((values - (center - 0.5)) / max(width - 1.0, 1e-12) + 0.5, 0.0, 1.0)


def read_dicom(path) -> np.ndarray:
    """Reads a single-frame grayscale DICOM image as float32 [H, W] in [0, 1].

    Applies the modality LUT (rescale slope/intercept or LUT), then the first VOI LUT of
    the VOI LUT sequence, else the first window (centre/width/function), else the image's
    min-max range; MONOCHROME1 images are inverted so that higher values are brighter.
    """
    pydicom, pixels = _pydicom()
    ds = pydicom.dcmread(path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{path}: only grayscale DICOM is supported, got {photometric}")
    arr = ds.pixel_array
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected one frame, got pixel array shape {arr.shape}")
    values = pixels.apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0]
        out = pixels.apply_voi(values, ds, index=0).astype(np.float64)
        out = out / float(2 ** int(lut.LUTDescriptor[2]) - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
        out = window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
    else:
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) / max(hi - lo, 1e-12)
    out = np.clip(out, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)
