"""What is true of one synthetic study: sampled findings, negations, views and labels.

Image and report are both rendered from a `StudySpec`, so they agree by construction; the
CheXpert labels follow the MIMIC convention (1 stated, 0 negated, -1 hedged, NaN unmentioned).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from medvlp_jax.data.records import CHEXPERT_CLASSES, FIVE_CLASSES

LOBES = (
    "right upper lobe",
    "right middle lobe",
    "right lower lobe",
    "left upper lobe",
    "lingula",
    "left lower lobe",
)
ZONES = ("upper", "mid", "lower")
DEVICES = (
    "endotracheal tube",
    "nasogastric tube",
    "right internal jugular catheter",
    "left picc",
    "pacemaker",
    "sternotomy wires",
)
# Parenchymal findings whose presence makes "Lung Opacity" positive (CheXpert hierarchy).
OPACITY_CHILDREN = ("Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis")
# Classes never stated absent by a sentence of their own.
_NEVER_NEGATED = ("No Finding", "Lung Opacity", "Support Devices")

# Probability that a study (not forced) has each pathology, and that a positive is hedged.
_PATHOLOGY_P = {
    "Pleural Effusion": 0.28,
    "Cardiomegaly": 0.22,
    "Atelectasis": 0.22,
    "Edema": 0.14,
    "Consolidation": 0.12,
    "Pneumonia": 0.08,
    "Pneumothorax": 0.07,
    "Lung Lesion": 0.06,
    "Enlarged Cardiomediastinum": 0.07,
    "Pleural Other": 0.03,
    "Fracture": 0.04,
}
_UNCERTAIN_P = 0.15
# Probability that an absent class is explicitly negated in the report.
_NEGATE_P = {
    "Pleural Effusion": 0.75,
    "Pneumothorax": 0.75,
    "Consolidation": 0.6,
    "Edema": 0.45,
    "Cardiomegaly": 0.55,
    "Enlarged Cardiomediastinum": 0.35,
    "Pneumonia": 0.3,
    "Lung Lesion": 0.15,
    "Fracture": 0.25,
    "Atelectasis": 0.1,
    "Pleural Other": 0.05,
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One abnormality (or device) present in the image and named in the report.

    Attributes:
      name: a CHEXPERT_CLASSES name.
      uncertain: hedged in the report (label -1); rendered subtle.
      side: 'right' | 'left' | 'bilateral' | '' (patient side).
      location: lobe (LOBES), zone (ZONES), device (DEVICES), 'apical'/'lateral', rib number.
      severity: 0 (small/mild), 1 (moderate), 2 (large/severe).
      size_cm: lesion diameter.
    """

    name: str
    uncertain: bool = False
    side: str = ""
    location: str = ""
    severity: int = 0
    size_cm: float = 0.0


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """A study: its findings, the classes its report negates, views, report shape."""

    findings: tuple[Finding, ...]
    negated: tuple[str, ...]
    views: tuple[str, ...]
    impression_only: bool
    lungs_clear: bool  # the report says the lungs are clear (Lung Opacity 0)


def _side(rng, p_bilateral: float) -> str:
    u = rng.random()
    if u < p_bilateral:
        return "bilateral"
    return "right" if u < p_bilateral + (1 - p_bilateral) / 2 else "left"


def _severity(rng, probs=(0.5, 0.35, 0.15)) -> int:
    return int(rng.choice(3, p=probs))


def sample_finding(rng: np.random.Generator, name: str, uncertain: bool) -> Finding:
    """Samples the side / location / severity of one finding of class `name`."""
    if name == "Pleural Effusion":
        return Finding(name, uncertain, side=_side(rng, 0.35), severity=_severity(rng))
    if name == "Pneumothorax":
        return Finding(
            name, uncertain, side=_side(rng, 0.0), severity=_severity(rng, (0.6, 0.3, 0.1))
        )
    if name in ("Consolidation", "Pneumonia"):
        lobe = LOBES[int(rng.choice(6, p=(0.15, 0.12, 0.25, 0.13, 0.1, 0.25)))]
        side = "right" if lobe.startswith("right") else "left"
        return Finding(name, uncertain, side=side, location=lobe, severity=_severity(rng))
    if name == "Edema":
        return Finding(
            name, uncertain, side="bilateral", severity=_severity(rng, (0.45, 0.4, 0.15))
        )
    if name == "Atelectasis":
        return Finding(name, uncertain, side=_side(rng, 0.4), severity=_severity(rng))
    if name in ("Cardiomegaly", "Enlarged Cardiomediastinum"):
        return Finding(name, uncertain, severity=_severity(rng))
    if name == "Lung Lesion":
        mass = rng.random() < 0.35
        size = rng.uniform(3.2, 6.0) if mass else rng.uniform(0.8, 2.8)
        zone = ZONES[int(rng.integers(3))]
        return Finding(name, uncertain, side=_side(rng, 0.0), location=zone, size_cm=round(size, 1))
    if name == "Pleural Other":
        where = "apical" if rng.random() < 0.35 else "lateral"
        return Finding(name, uncertain, side=_side(rng, 0.0), location=where)
    if name == "Fracture":
        return Finding(name, uncertain, side=_side(rng, 0.0), location=str(int(rng.integers(4, 9))))
    raise ValueError(f"no sampler for finding {name!r}")


def _devices(rng: np.random.Generator, portable: bool) -> list[Finding]:
    count = 1 + int(rng.random() < 0.4)
    probs = np.array(
        [0.3, 0.25, 0.2, 0.1, 0.08, 0.07] if portable else [0.05, 0.05, 0.2, 0.25, 0.25, 0.2]
    )
    idx = rng.choice(len(DEVICES), size=count, replace=False, p=probs / probs.sum())
    return [Finding("Support Devices", location=DEVICES[i]) for i in sorted(idx)]


def sample_study(rng: np.random.Generator, forced: str | None = None) -> StudySpec:
    """Samples one study; `forced` (a FIVE_CLASSES name) gives exactly that one of the five.

    A forced study has `forced` definitely positive, the other four of FIVE_CLASSES and
    Pneumonia absent (so it belongs to one zero-shot class only).
    """
    portable = rng.random() < 0.35
    views = ("AP",) if portable else ("PA",)
    if rng.random() < 0.3:
        views += ("LATERAL" if rng.random() < 0.8 else "LL",)
    findings: list[Finding] = []
    if forced is not None:
        if forced not in FIVE_CLASSES:
            raise ValueError(f"forced class must be one of {FIVE_CLASSES}, got {forced!r}")
        findings.append(sample_finding(rng, forced, uncertain=False))
        for name in ("Pneumothorax", "Lung Lesion", "Pleural Other", "Fracture"):
            if rng.random() < _PATHOLOGY_P[name] / 2:
                findings.append(sample_finding(rng, name, rng.random() < _UNCERTAIN_P))
    elif rng.random() >= 0.3:
        for name, p in _PATHOLOGY_P.items():
            if rng.random() < p:
                findings.append(sample_finding(rng, name, rng.random() < _UNCERTAIN_P))
    if rng.random() < (0.5 if portable else 0.12):
        findings.extend(_devices(rng, portable))
    present = {f.name for f in findings}
    negated = tuple(
        name
        for name in CHEXPERT_CLASSES
        if name not in present and name not in _NEVER_NEGATED and rng.random() < _NEGATE_P[name]
    )
    lungs_clear = not present.intersection(OPACITY_CHILDREN) and rng.random() < 0.5
    return StudySpec(
        findings=tuple(findings),
        negated=negated,
        views=views,
        impression_only=rng.random() < 0.12,
        lungs_clear=lungs_clear,
    )


def study_labels(spec: StudySpec) -> np.ndarray:
    """CheXpert labels float32 [14] (1 / 0 / -1 / NaN) that the study's report states."""
    labels = np.full(len(CHEXPERT_CLASSES), np.nan, np.float32)
    index = {name: i for i, name in enumerate(CHEXPERT_CLASSES)}
    for name in spec.negated:
        labels[index[name]] = 0.0
    for f in spec.findings:  # a stated finding outranks a hedged one of the same class
        i = index[f.name]
        labels[i] = 1.0 if not f.uncertain or labels[i] == 1.0 else -1.0
    # Lung Opacity from its children: 1 if any child is positive, else -1 if any is hedged.
    children = [labels[index[c]] for c in OPACITY_CHILDREN]
    if any(v == 1.0 for v in children):
        labels[index["Lung Opacity"]] = 1.0
    elif any(v == -1.0 for v in children):
        labels[index["Lung Opacity"]] = -1.0
    elif spec.lungs_clear:
        labels[index["Lung Opacity"]] = 0.0
    pathologies = [n for n in CHEXPERT_CLASSES if n not in ("No Finding", "Support Devices")]
    if not any(labels[index[n]] in (1.0, -1.0) for n in pathologies):
        labels[index["No Finding"]] = 1.0
    return labels
