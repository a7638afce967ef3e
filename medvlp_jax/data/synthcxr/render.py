"""Renders a study's images: chest-radiograph-like pictures whose findings match its spec.

Everything is built in a density map D [S, S] (higher = more attenuating = brighter) on a
patient-coordinate `Canvas` (x: patient right -> left, i.e. image left -> right, as on a PA
film; y: head -> feet), then mapped to 8-bit intensities with a per-patient exposure.
Each rendered finding also yields a boolean mask; masks are stored as one uint16 bit map
(bit k = CHEXPERT_CLASSES[k]).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from medvlp_jax.data.records import CHEXPERT_CLASSES
from medvlp_jax.data.synthcxr.draw import Canvas, bezier, smooth_noise
from medvlp_jax.data.synthcxr.findings import OPACITY_CHILDREN, Finding, StudySpec

_BIT = {name: i for i, name in enumerate(CHEXPERT_CLASSES)}
_SIDES = {"right": (-1.0,), "left": (1.0,), "bilateral": (-1.0, 1.0)}
_SIDE_NAME = {-1.0: "right", 1.0: "left"}


@dataclasses.dataclass
class Rendered:
    """One image: pixels uint8 [S, S], finding bit map uint16 [S, S], boxes.

    boxes: (finding, location, x0, y0, x1, y1) with pixel bounds, x1/y1 exclusive.
    """

    image: np.ndarray
    masks: np.ndarray
    boxes: list[tuple[str, str, int, int, int, int]]


@dataclasses.dataclass
class _Parts:
    """The rendered findings: (class name, location, bool mask [S, S]) per instance."""

    instances: list[tuple[str, str, np.ndarray]] = dataclasses.field(default_factory=list)

    def add(self, name: str, location: str, soft: np.ndarray) -> None:
        self.instances.append((name, location, soft > 0.5))


def _pose(rng: np.random.Generator) -> dict:
    return dict(
        scale=rng.uniform(0.9, 1.03),
        shift=(rng.uniform(-0.04, 0.04), rng.uniform(-0.02, 0.05)),
        angle=np.deg2rad(rng.uniform(-4.0, 4.0)),
    )


def _exposure(d: np.ndarray, rng: np.random.Generator, portable: bool, size: int) -> np.ndarray:
    """Density [S, S] -> uint8 [S, S] with random window, gamma, blur and noise."""
    black = rng.uniform(-0.02, 0.06)
    white = rng.uniform(0.80, 0.98) + (0.08 if portable else 0.0)
    gamma = rng.uniform(0.8, 1.2)
    img = np.clip((d - black) / (white - black), 0.0, 1.0) ** gamma
    img = ndimage.gaussian_filter(img, sigma=0.45 * size / 128)
    noise = rng.uniform(0.008, 0.02) * (1.6 if portable else 1.0)
    img = img + noise * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _severity_scale(f: Finding, values) -> float:
    """The finding's strength from a per-severity triple; hedged findings are subtle."""
    return values[f.severity] * (0.55 if f.uncertain else 1.0)


class _Frontal:
    """A PA/AP chest: anatomy masks, then findings as density edits."""

    def __init__(self, cv: Canvas, rng: np.random.Generator, spec: StudySpec):
        self.cv, self.rng = cv, rng
        x, y = cv.x, cv.y
        self.lung_cx = rng.uniform(0.36, 0.42)
        self.lung_ax = rng.uniform(0.31, 0.35)
        self.lung_cy = rng.uniform(-0.06, 0.0)
        self.lung_ay = rng.uniform(0.68, 0.74)
        dome_r = rng.uniform(0.44, 0.52)
        self.dome = {-1.0: dome_r, 1.0: dome_r + rng.uniform(0.02, 0.07)}
        dome_h = rng.uniform(0.10, 0.16)
        self.thorax_w = 2 * (self.lung_cx + self.lung_ax)
        self.med_w = rng.uniform(0.10, 0.13)
        ec = [f for f in spec.findings if f.name == "Enlarged Cardiomediastinum"]
        if ec:
            self.med_w += _severity_scale(ec[0], (0.05, 0.075, 0.1))
        cm = [f for f in spec.findings if f.name == "Cardiomegaly"]
        ctr = rng.uniform(0.40, 0.47)
        if cm:
            ctr = _severity_scale(cm[0], (0.57, 0.61, 0.66)) + rng.uniform(-0.015, 0.015)
            ctr = max(ctr, 0.52)
        self.ctr = ctr
        self.heart_cx = rng.uniform(0.05, 0.09)
        self.heart_cy = rng.uniform(0.19, 0.25)
        heart_ax = ctr * self.thorax_w / 2
        self.heart = cv.ellipse(self.heart_cx, self.heart_cy, heart_ax, rng.uniform(0.27, 0.31))
        self.body = cv.superellipse(
            0.0, 0.25, self.lung_cx + self.lung_ax + rng.uniform(0.1, 0.16), 1.4, 3.0
        )
        knob = cv.ellipse(self.med_w + 0.015, -0.40, 0.055, 0.05)
        self.med = np.maximum(cv.soft(np.minimum(self.med_w - np.abs(x), self.heart_cy - y)), knob)
        self.lung_e_sd, self.lung, self.below_dome = {}, {}, {}
        for s in (-1.0, 1.0):
            cx = s * self.lung_cx
            e_sd = cv.ellipse_sd(cx, self.lung_cy, self.lung_ax, self.lung_ay)
            rel = np.clip(1.0 - ((x - cx) / self.lung_ax) ** 2, 0.0, 1.0)
            dome_sd = self.dome[s] - dome_h * rel - y
            sd = np.minimum(np.minimum(e_sd, dome_sd), s * x - self.med_w)
            self.lung_e_sd[s] = e_sd
            self.lung[s] = cv.soft(sd) * (1.0 - self.heart) * (1.0 - knob)
            self.below_dome[s] = cv.soft(-dome_sd) * cv.soft(s * x)
        self.lungs = self.lung[-1.0] + self.lung[1.0]
        self.markings = self._markings()
        self.rib_band, self.rib_index, self.rib_ax = self._ribs()
        self.d = np.zeros_like(x)

    def _markings(self) -> np.ndarray:
        """Vessels fanning out of each hilum (tapering radial streaks) plus fine texture."""
        cv, rng = self.cv, self.rng
        vessels = np.zeros_like(cv.x)
        for s in (-1.0, 1.0):
            corners = [(s * 0.08, -0.75), (s * 0.8, -0.75), (s * 0.08, 0.6), (s * 0.8, 0.6)]
            rows, cols = cv.window(corners)
            x, y = cv.x[rows, cols], cv.y[rows, cols]
            dx, dy = s * (x - s * 0.18), y + 0.02
            r = np.hypot(dx, dy)
            theta = np.arctan2(dy, dx)
            phase = rng.uniform(0, 2 * np.pi, 2)
            wave = np.cos(9.0 * theta + phase[0] + 1.2 * np.sin(7.0 * r + phase[1]))
            streaks = (0.5 + 0.5 * wave) ** (3.0 + 14.0 * r) * np.exp(-r / 0.4)
            vessels[rows, cols] += streaks * (r < 0.6)
            vessels = np.maximum(vessels, cv.ellipse(s * 0.19, -0.02, 0.05, 0.085))
        texture = smooth_noise(rng, cv.size, 20)
        return 0.15 * vessels + 0.018 * texture

    def _ribs(self):
        """Posterior ribs as one periodic band pattern: band [S, S], rib index, |x|."""
        ax = np.abs(self.cv.x)
        t = ax - 0.08
        y0 = self.cv.y + 0.05 * t - 0.6 * t**2  # the rib's height at the spine
        first, spacing = -0.66, 0.12
        phase = (y0 - first) / spacing
        index = np.rint(phase)
        dist = np.abs(phase - index) * spacing
        thickness = 0.032 + 0.015 * np.clip(t, 0, 1)
        band = self.cv.soft(0.5 * thickness - dist)
        band *= (index >= 0) & (index <= 9) & (ax > 0.08)
        band *= self.cv.soft(self.lung_cx + self.lung_ax + 0.05 - ax)
        return band, index, ax

    def _anterior_ribs(self) -> np.ndarray:
        """Faint anterior ribs, running down towards the sternum."""
        ax = np.abs(self.cv.x)
        phase = (self.cv.y - 0.3 * (self.lung_cx + self.lung_ax - ax) + 0.75) / 0.16
        dist = np.abs(phase - np.rint(phase)) * 0.16
        band = self.cv.soft(0.014 - dist) * (phase > -0.5) * (phase < 6.5)
        return band * self.cv.soft(self.lung_cx + self.lung_ax - ax) * self.cv.soft(ax - 0.1)

    def _clavicles(self) -> np.ndarray:
        cv = self.cv
        return sum(
            cv.stroke(bezier((s * 0.08, -0.64), (s * 0.35, -0.72), (s * 0.7, -0.86)), 0.045)
            for s in (-1.0, 1.0)
        )

    # ----- findings -------------------------------------------------------------------------

    def effusion(self, f: Finding, out: _Parts) -> None:
        x, y = self.cv.x, self.cv.y
        for s in _SIDES[f.side]:
            height = _severity_scale(f, (0.22, 0.36, 0.56))
            rel = np.clip((s * x - self.med_w) / (self.lung_cx + self.lung_ax - self.med_w), 0, 1)
            top = self.dome[s] - height + 0.10 * (1.0 - rel) ** 1.5  # meniscus: higher laterally
            region = self.lung[s] * self.cv.soft(y - top)
            self.d += (0.30 + 0.06 * np.clip((y - top) / 0.2, 0, 1)) * region
            self.markings *= 1.0 - region
            out.add(f.name, _SIDE_NAME[s], region)

    def pneumothorax(self, f: Finding, out: _Parts) -> None:
        s = _SIDES[f.side][0]
        collapse = 1.0 - _severity_scale(f, (0.14, 0.24, 0.36))
        cv = self.cv
        inner_sd = cv.ellipse_sd(
            s * (self.lung_cx - (1 - collapse) * 0.18),
            self.lung_cy + (1 - collapse) * 0.45,
            self.lung_ax * collapse,
            self.lung_ay * collapse,
        )
        region = self.lung[s] * cv.soft(-inner_sd) * cv.soft(self.dome[s] - 0.12 - cv.y)
        self.markings *= 1.0 - region
        self.d -= 0.05 * region
        line = (
            cv.soft(0.006 - np.abs(inner_sd)) * self.lung[s] * cv.soft(self.dome[s] - 0.12 - cv.y)
        )
        self.d += 0.12 * line
        out.add(f.name, _SIDE_NAME[s], region)

    def _lobe(self, lobe: str):
        """Centre and region mask [S, S] of a lobe as projected on a frontal film."""
        x, y, cv = self.cv.x, self.cv.y, self.cv
        s = -1.0 if lobe.startswith("right") else 1.0
        lung = self.lung[s]
        if lobe.endswith("upper lobe"):
            return (s * self.lung_cx, self.lung_cy - 0.38), lung * cv.soft(self.lung_cy - 0.1 - y)
        if lobe in ("right middle lobe", "lingula"):
            centre = (s * (self.med_w + 0.17), 0.18)
            band = np.minimum(y + 0.05, 0.38 - y)
            return centre, lung * cv.soft(np.minimum(band, self.lung_cx + 0.05 - s * x))
        centre = (s * (self.lung_cx + 0.03), self.dome[s] - 0.16)
        region = lung * cv.soft(y - 0.12)
        if s > 0:  # left lower lobe: also behind the heart (retrocardiac), seen fainter
            region = np.maximum(region, 0.5 * self.heart * cv.soft(np.minimum(x - 0.04, y - 0.15)))
        return centre, region

    def airspace(self, f: Finding, out: _Parts) -> None:
        """Consolidation (dense, confluent) or pneumonia (patchy) in a lobe."""
        (cx, cy), lobe = self._lobe(f.location)
        cv = self.cv
        grow = (0.8, 1.0, 1.2)[f.severity]
        noise = smooth_noise(self.rng, cv.size, 14)
        patchy = f.name == "Pneumonia"
        sd = cv.ellipse_sd(cx, cy, 0.17 * grow, 0.15 * grow) + (0.07 if patchy else 0.035) * noise
        region = cv.soft(sd - (0.01 if patchy else 0.0)) * lobe
        self.d += _severity_scale(f, (0.22, 0.27, 0.32)) * region
        self.markings *= 1.0 - 0.7 * region
        out.add(f.name, f.location, region)

    def edema(self, f: Finding, out: _Parts) -> None:
        x, y, cv = self.cv.x, self.cv.y, self.cv
        haze = np.exp(-(((np.abs(x) - 0.22) / 0.24) ** 2 + ((y - 0.02) / 0.38) ** 2))
        strength = _severity_scale(f, (0.12, 0.18, 0.25))
        self.d += (strength * haze + 0.3 * strength * self.lungs) * self.lungs
        self.markings *= 1.0 - 0.5 * haze
        if f.severity >= 1 and not f.uncertain:  # Kerley B lines at the lateral bases
            for s in (-1.0, 1.0):
                xl = s * (self.lung_cx + self.lung_ax - 0.03)
                for yk in np.linspace(self.dome[s] - 0.26, self.dome[s] - 0.06, 5):
                    line = cv.stroke([(xl, yk), (xl - s * 0.06, yk)], 0.008)
                    self.d += 0.07 * line * self.lung[s]
        out.add(f.name, "bilateral", haze * self.lungs * (haze > 0.35))

    def atelectasis(self, f: Finding, out: _Parts) -> None:
        x, y, cv = self.cv.x, self.cv.y, self.cv
        for s in _SIDES[f.side]:
            cx = s * self.lung_cx
            level = self.dome[s] - self.rng.uniform(0.1, 0.2)
            line_y = level + self.rng.uniform(-0.15, 0.15) * (x - cx)
            thick = (0.025, 0.035, 0.05)[f.severity]
            band = cv.soft(np.minimum(0.5 * thick - np.abs(y - line_y), 0.21 - np.abs(x - cx)))
            band *= self.lung[s]
            self.d += (0.26 if not f.uncertain else 0.16) * band
            out.add(f.name, _SIDE_NAME[s], band)

    def lesion(self, f: Finding, out: _Parts) -> None:
        s = _SIDES[f.side][0]
        zone_y = {
            "upper": self.lung_cy - 0.4,
            "mid": self.lung_cy + 0.05,
            "lower": self.dome[s] - 0.24,
        }[f.location]
        cx = s * (self.lung_cx + self.rng.uniform(-0.08, 0.08))
        cy = zone_y + self.rng.uniform(-0.04, 0.04)
        r = max(f.size_cm * 0.025, 1.2 * self.cv.px)
        sd = self.cv.ellipse_sd(cx, cy, r, r * self.rng.uniform(0.85, 1.15))
        if f.size_cm >= 3:  # masses are lobulated
            sd = sd + 0.25 * r * smooth_noise(self.rng, self.cv.size, 24)
        blob = self.cv.soft(sd)
        self.d += (0.32 if not f.uncertain else 0.18) * blob
        out.add(f.name, f"{f.side} {f.location}", blob)

    def pleural_other(self, f: Finding, out: _Parts) -> None:
        s = _SIDES[f.side][0]
        cv, y = self.cv, self.cv.y
        rim = self.lung[s] * cv.soft(0.035 - self.lung_e_sd[s])
        if f.location == "apical":
            rim *= cv.soft(self.lung_cy - 0.5 - y)
        else:
            rim *= cv.soft(np.minimum(y - (self.lung_cy - 0.35), self.dome[s] - 0.12 - y))
            rim *= cv.soft(s * cv.x - self.lung_cx)
        self.d += (0.2 if not f.uncertain else 0.12) * rim
        out.add(f.name, f"{f.side} {f.location}", rim)

    def fracture(self, f: Finding, out: _Parts) -> None:
        s = _SIDES[f.side][0]
        k = int(f.location) - 1
        ax_f = self.rng.uniform(0.45, 0.62)
        t = ax_f - 0.08
        yk = -0.66 + k * 0.12 - 0.05 * t + 0.6 * t**2
        side = (s * self.cv.x) > 0
        gap = side & (self.rib_index == k) & (np.abs(self.rib_ax - ax_f) < 0.014)
        self.rib_band = np.where(gap, 0.0, self.rib_band)
        callus = self.cv.ellipse(s * ax_f, yk, 0.03, 0.022)
        self.d += (0.07 if not f.uncertain else 0.04) * callus
        out.add(f.name, f"{f.side} rib {f.location}", self.cv.ellipse(s * ax_f, yk, 0.05, 0.05))

    def device(self, f: Finding, out: _Parts) -> None:
        cv, rng = self.cv, self.rng
        dome_l = self.dome[1.0]
        if f.location == "endotracheal tube":
            tip = -0.28 - rng.uniform(0.08, 0.2)
            mask = cv.stroke([(0.005, -1.3), (0.0, tip)], 0.022)
        elif f.location == "nasogastric tube":
            path = np.concatenate(
                [
                    np.array([(0.02, -1.3), (0.035, -0.3)]),
                    bezier((0.05, dome_l - 0.1), (0.12, dome_l + 0.25), (0.36, dome_l + 0.12)),
                ]
            )
            mask = cv.stroke(path, 0.014)
        elif f.location == "right internal jugular catheter":
            tip = rng.uniform(-0.22, -0.06)
            mask = cv.stroke(bezier((-0.2, -1.3), (-0.15, -0.55), (-0.05, tip)), 0.012)
        elif f.location == "left picc":
            tip = rng.uniform(-0.15, 0.0)
            arm = bezier((1.0, -0.45), (0.55, -0.72), (0.12, -0.58))
            mask = cv.stroke(np.concatenate([arm, [(-0.04, -0.45), (-0.05, tip)]]), 0.01)
        elif f.location == "pacemaker":
            box = cv.soft(np.minimum(0.09 - np.abs(cv.x - 0.55), 0.06 - np.abs(cv.y + 0.68)))
            leads = cv.stroke(bezier((0.5, -0.64), (0.1, -0.6), (-0.04, -0.18)), 0.012)
            leads = np.maximum(
                leads, cv.stroke(bezier((-0.04, -0.18), (-0.06, 0.15), (0.12, 0.36)), 0.012)
            )
            mask = np.maximum(box * 1.3, leads)
        elif f.location == "sternotomy wires":
            mask = sum(
                cv.soft(0.006 - np.abs(cv.ellipse_sd(0.0, -0.45 + 0.17 * k, 0.03, 0.02)))
                for k in range(5)
            )
        else:
            raise ValueError(f"unknown device {f.location!r}")
        self.d += 0.55 * mask
        out.add(f.name, f.location, mask)

    def draw(self, spec: StudySpec) -> _Parts:
        """Composes anatomy and findings into `self.d`; returns the finding masks."""
        cv = self.cv
        out = _Parts()
        dispatch = {
            "Pleural Effusion": self.effusion,
            "Pneumothorax": self.pneumothorax,
            "Consolidation": self.airspace,
            "Pneumonia": self.airspace,
            "Edema": self.edema,
            "Atelectasis": self.atelectasis,
            "Lung Lesion": self.lesion,
            "Pleural Other": self.pleural_other,
            "Fracture": self.fracture,
            "Support Devices": self.device,
        }
        for f in spec.findings:
            if f.name in dispatch:
                dispatch[f.name](f, out)
            elif f.name == "Cardiomegaly":
                out.add(f.name, "heart", self.heart)
            elif f.name == "Enlarged Cardiomediastinum":
                out.add(f.name, "mediastinum", self.med * cv.soft(self.heart_cy - 0.2 - cv.y))
        below = np.maximum(self.below_dome[-1.0], self.below_dome[1.0])
        bubble = cv.ellipse(0.33, self.dome[1.0] + 0.1, 0.08, 0.045)
        trachea = cv.soft(np.minimum(0.032 - np.abs(cv.x), -0.28 - cv.y))
        spine = cv.soft(0.07 - np.abs(cv.x)) * (0.8 + 0.2 * (np.cos(cv.y * 2 * np.pi / 0.12) > 0.6))
        neck = cv.soft(np.minimum(0.2 - np.abs(cv.x), -0.75 - cv.y))
        soft_tissue = np.maximum(np.maximum(0.15 * self.heart, 0.13 * self.med), 0.11 * below)
        self.d += np.maximum(self.body, neck) * (
            0.44
            + soft_tissue * (1.0 - self.lungs)
            + 0.05 * spine
            + 0.085 * self.rib_band
            + 0.04 * self._anterior_ribs()
            + 0.15 * self._clavicles()
        )
        self.d += -0.32 * self.lungs + self.markings * self.lungs
        self.d -= 0.12 * trachea + 0.14 * bubble * (1.0 - self.lungs)
        return out


class _Lateral:
    """A lateral chest (anterior = image left): the findings visible on a lateral film."""

    def __init__(self, cv: Canvas, rng: np.random.Generator, spec: StudySpec):
        self.cv, self.rng = cv, rng
        x, y = cv.x, cv.y
        self.dome0 = rng.uniform(0.45, 0.52)
        rel = np.clip(1.0 - ((x - 0.05) / 0.6) ** 2, 0.0, 1.0)
        self.dome_sd = self.dome0 - 0.10 * rel + 0.06 * x - y
        e_sd = cv.ellipse_sd(0.08, -0.05, 0.58, 0.70)
        self.lung = cv.soft(np.minimum(e_sd, self.dome_sd))
        cm = [f for f in spec.findings if f.name == "Cardiomegaly"]
        grow = 1.0 + (_severity_scale(cm[0], (0.2, 0.28, 0.38)) if cm else rng.uniform(-0.05, 0.05))
        self.heart = cv.ellipse(-0.30 + 0.05 * (grow - 1), 0.28, 0.28 * grow, 0.27 * grow**0.5)
        self.body = cv.superellipse(0.02, 0.25, 0.82, 1.4, 2.6)
        self.d = np.zeros_like(x)

    def _blob(self, cx, cy, ax, ay, strength, noise=0.04):
        sd = self.cv.ellipse_sd(cx, cy, ax, ay) + noise * smooth_noise(self.rng, self.cv.size, 14)
        region = self.cv.soft(sd) * self.lung
        self.d += strength * region
        return region

    def draw(self, spec: StudySpec) -> _Parts:
        cv, rng, out = self.cv, self.rng, _Parts()
        x, y = cv.x, cv.y
        for f in spec.findings:
            if f.name == "Pleural Effusion":
                height = _severity_scale(f, (0.12, 0.24, 0.42)) * (
                    1.2 if f.side == "bilateral" else 1
                )
                top = self.dome0 - height - 0.08 * np.clip((x + 0.2) / 0.8, 0, 1)
                region = self.lung * cv.soft(y - top)
                self.d += 0.3 * region
                out.add(f.name, f.side, region)
            elif f.name in ("Consolidation", "Pneumonia"):
                if f.location.endswith("upper lobe"):
                    cx, cy = 0.1, -0.4
                elif f.location in ("right middle lobe", "lingula"):
                    cx, cy = -0.25, 0.08
                else:
                    cx, cy = 0.35, 0.22
                grow = (0.8, 1.0, 1.2)[f.severity]
                strength = _severity_scale(f, (0.2, 0.25, 0.3))
                noise = 0.07 if f.name == "Pneumonia" else 0.035
                out.add(
                    f.name,
                    f.location,
                    self._blob(cx, cy, 0.17 * grow, 0.14 * grow, strength, noise),
                )
            elif f.name == "Edema":
                haze = np.exp(-(((x - 0.02) / 0.35) ** 2 + ((y - 0.0) / 0.4) ** 2)) * self.lung
                self.d += _severity_scale(f, (0.12, 0.18, 0.25)) * haze
                out.add(f.name, "bilateral", haze * (haze > 0.35))
            elif f.name == "Atelectasis":
                line_y = self.dome0 - 0.15 + rng.uniform(-0.1, 0.1) * x
                band = cv.soft(np.minimum(0.02 - np.abs(y - line_y), 0.3 - np.abs(x - 0.15)))
                band *= self.lung
                self.d += (0.24 if not f.uncertain else 0.15) * band
                out.add(f.name, f.side, band)
            elif f.name == "Lung Lesion":
                cy = {"upper": -0.4, "mid": 0.0, "lower": 0.3}[f.location]
                r = max(f.size_cm * 0.025, 1.2 * cv.px)
                blob = cv.ellipse(rng.uniform(-0.2, 0.3), cy, r, r)
                self.d += (0.3 if not f.uncertain else 0.17) * blob
                out.add(f.name, f"{f.side} {f.location}", blob)
            elif f.name == "Cardiomegaly":
                out.add(f.name, "heart", self.heart)
            elif f.name == "Support Devices":
                self._device(f, out)
        trachea = cv.stroke([(-0.08, -1.3), (0.06, -0.15)], 0.07)
        spine = cv.soft(0.11 - np.abs(x - 0.67)) * (
            0.6 + 0.4 * (np.cos(y * 2 * np.pi / 0.14) > -0.6)
        )
        sternum = cv.stroke([(-0.70, -0.6), (-0.76, 0.25)], 0.05)
        hilum = cv.ellipse(0.05, -0.02, 0.12, 0.1)
        ribs = cv.soft(0.012 - np.abs(((y - 0.35 * x) / 0.13) % 1.0 - 0.5) * 0.13) * self.lung
        below = cv.soft(-self.dome_sd)
        self.d += self.body * (0.46 + 0.08 * below + 0.22 * spine + 0.12 * sternum)
        self.d += -0.30 * self.lung + 0.14 * self.heart + 0.1 * hilum * self.lung
        self.d += 0.04 * ribs - 0.12 * trachea
        self.d += 0.015 * smooth_noise(rng, cv.size, 20) * self.lung
        return out

    def _device(self, f: Finding, out: _Parts) -> None:
        cv = self.cv
        paths = {
            "endotracheal tube": ([(-0.1, -1.3), (0.0, -0.45)], 0.022),
            "nasogastric tube": (bezier((0.05, -1.3), (0.2, 0.2), (-0.05, 0.8)), 0.014),
            "right internal jugular catheter": (
                bezier((-0.1, -1.3), (-0.2, -0.6), (-0.15, -0.1)),
                0.012,
            ),
            "left picc": (bezier((-0.05, -1.3), (-0.2, -0.6), (-0.15, -0.05)), 0.01),
            "pacemaker": (bezier((-0.6, -0.6), (-0.3, -0.3), (-0.35, 0.3)), 0.012),
            "sternotomy wires": ([(-0.72, -0.45), (-0.75, 0.2)], 0.012),
        }
        points, width = paths[f.location]
        mask = cv.stroke(points, width)
        if f.location == "pacemaker":
            mask = np.maximum(mask, 1.3 * cv.ellipse(-0.62, -0.62, 0.05, 0.08))
        self.d += 0.55 * mask
        out.add(f.name, f.location, mask)


def _encode_masks(parts: _Parts, size: int):
    """Bit map uint16 [S, S] and boxes from the mask instances (Lung Opacity = its children)."""
    bits = np.zeros((size, size), np.uint16)
    boxes = []
    opacity = np.zeros((size, size), bool)
    for name, location, mask in parts.instances:
        bits |= mask.astype(np.uint16) << np.uint16(_BIT[name])
        if name in OPACITY_CHILDREN:
            opacity |= mask
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size:
            boxes.append(
                (name, location, int(cols[0]), int(rows[0]), int(cols[-1] + 1), int(rows[-1] + 1))
            )
    bits |= opacity.astype(np.uint16) << np.uint16(_BIT["Lung Opacity"])
    return bits, boxes


def render_image(spec: StudySpec, view: str, size: int, rng: np.random.Generator) -> Rendered:
    """Renders one view ('PA' | 'AP' | 'LATERAL' | 'LL') of `spec` at `size` x `size` px."""
    cv = Canvas(size, **_pose(rng))
    scene = _Frontal(cv, rng, spec) if view in ("PA", "AP") else _Lateral(cv, rng, spec)
    parts = scene.draw(spec)
    image = _exposure(scene.d, rng, portable=view == "AP", size=size)
    bits, boxes = _encode_masks(parts, size)
    return Rendered(image=image, masks=bits, boxes=boxes)
