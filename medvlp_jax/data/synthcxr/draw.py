"""Vectorised 2-D drawing on a patient-coordinate grid (no per-pixel Python loops).

Shapes are soft masks float32 [S, S] in [0, 1] with a one-pixel anti-aliased edge, built from
an approximate signed distance (patient units, positive inside).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


class Canvas:
    """The patient coordinates of every pixel of one S x S image.

    Image coordinates u (columns, left to right) and v (rows, top to bottom) run over [-1, 1];
    patient coordinates are `x = R(angle) (u - shift_x, v - shift_y) / scale`, so a pose
    change (size, position, rotation) moves every shape and every mask together.

    Attributes:
      x, y: float32 [S, S] patient coordinates of the pixel centres.
      px: the size of one pixel in patient units.
    """

    def __init__(self, size: int, *, scale=1.0, shift=(0.0, 0.0), angle=0.0):
        t = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
        u = (t[None, :] - shift[0]) / scale
        v = (t[:, None] - shift[1]) / scale
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        self.size = size
        self.x = (c * u + s * v).astype(np.float32)
        self.y = (-s * u + c * v).astype(np.float32)
        self.px = 2.0 / size / scale
        self._cos, self._sin, self._scale, self._shift = c, s, scale, shift

    def soft(self, sd: np.ndarray) -> np.ndarray:
        """Soft inside-mask [S, S] from a signed distance (patient units, > 0 inside)."""
        return np.clip(sd / self.px + 0.5, 0.0, 1.0).astype(np.float32)

    def ellipse_sd(self, cx, cy, ax, ay, angle=0.0) -> np.ndarray:
        """Approximate signed distance [S, S] to an ellipse (centre, semi-axes, rotation)."""
        dx, dy = self.x - cx, self.y - cy
        if angle:
            c, s = np.cos(angle), np.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        r = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)
        return (1.0 - r) * min(ax, ay)

    def ellipse(self, cx, cy, ax, ay, angle=0.0) -> np.ndarray:
        return self.soft(self.ellipse_sd(cx, cy, ax, ay, angle))

    def superellipse(self, cx, cy, ax, ay, p) -> np.ndarray:
        r = np.abs((self.x - cx) / ax) ** p + np.abs((self.y - cy) / ay) ** p
        return self.soft((1.0 - r ** (1.0 / p)) * min(ax, ay))

    def to_pixels(self, points) -> np.ndarray:
        """Patient points [K, 2] (x, y) -> pixel positions [K, 2] (column, row)."""
        pts = np.asarray(points, np.float32)
        u = self._cos * pts[:, 0] - self._sin * pts[:, 1]
        v = self._sin * pts[:, 0] + self._cos * pts[:, 1]
        u = u * self._scale + self._shift[0]
        v = v * self._scale + self._shift[1]
        return np.stack([(u + 1) * 0.5 * self.size - 0.5, (v + 1) * 0.5 * self.size - 0.5], 1)

    def window(self, points, margin: float = 0.0) -> tuple[slice, slice]:
        """(rows, cols) slices of the pixels covering the patient points' bounding box."""
        pix = self.to_pixels(points)
        pad = margin / self.px + 2
        lo = np.maximum(np.floor(pix.min(0) - pad).astype(int), 0)
        hi = np.minimum(np.ceil(pix.max(0) + pad).astype(int) + 1, self.size)
        return slice(lo[1], max(hi[1], lo[1])), slice(lo[0], max(hi[0], lo[0]))

    def stroke(self, points, width) -> np.ndarray:
        """Soft mask [S, S] of a polyline through `points` [K, 2] drawn `width` wide.

        Distances are computed only inside the polyline's pixel bounding box, for all
        segments at once ([K - 1, h, w]).
        """
        pts = np.asarray(points, np.float32)
        out = np.zeros(self.x.shape, np.float32)
        rows, cols = self.window(pts, 0.5 * width)
        xs, ys = self.x[rows, cols][None], self.y[rows, cols][None]
        if xs.size == 0:
            return out
        p0, p1 = pts[:-1, :, None, None], pts[1:, :, None, None]
        dx, dy = p1[:, 0] - p0[:, 0], p1[:, 1] - p0[:, 1]
        length2 = np.maximum(dx * dx + dy * dy, 1e-12)
        t = np.clip(((xs - p0[:, 0]) * dx + (ys - p0[:, 1]) * dy) / length2, 0.0, 1.0)
        d = np.hypot(xs - (p0[:, 0] + t * dx), ys - (p0[:, 1] + t * dy)).min(0)
        out[rows, cols] = self.soft(0.5 * width - d)
        return out


def bezier(p0, p1, p2, n: int = 8) -> np.ndarray:
    """Points [n, 2] on the quadratic Bezier curve with control point p1."""
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    p0, p1, p2 = (np.asarray(p, np.float32) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field float32 [size, size], about unit variance, `cells` bumps across."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.Resampling.BICUBIC))
    return field / max(float(field.std()), 1e-6)
