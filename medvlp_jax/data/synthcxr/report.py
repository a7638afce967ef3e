"""Writes a study's free-text report (MIMIC-CXR style) from its `StudySpec`.

Every finding of the spec is stated (hedged ones with "possible", "cannot be excluded", ...),
every negated class gets a negation sentence, and nothing else pathological is said, so the
CheXpert labels of `findings.study_labels` are what a reader of the report would extract.
Templates, synonyms and sentence order vary with the study's random generator.
"""

from __future__ import annotations

import textwrap

import numpy as np

from medvlp_jax.data.synthcxr.findings import OPACITY_CHILDREN, Finding, StudySpec

_SIZE = (("small", "trace", "minimal"), ("moderate", "moderate-sized"), ("large", "sizable"))
_GRADE = (("mild", "minimal"), ("moderate",), ("severe", "marked"))
_ADVERB = ("mildly", "moderately", "markedly")
_CONSOLIDATION = (("focal", "patchy"), ("confluent",), ("dense", "extensive"))
_ATELECTASIS = ("minimal", "mild", "moderate")
_ORDINAL = {
    str(k): w
    for k, w in enumerate(
        ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth"]
    )
}


class _Writer:
    """Picks template variants with the study's generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _phrase(w: _Writer, f: Finding) -> str:
    """The noun phrase naming a finding (with side, location, size)."""
    n, side = f.name, f.side
    if n == "Pleural Effusion":
        size = w.pick(_SIZE[f.severity])
        if f.severity == 2 and side != "bilateral" and w.rng.random() < 0.4:
            return f"{size} {side} pleural effusion with fluid layering in the {side} hemithorax"
        if side == "bilateral":
            return w.pick(
                [f"{size} bilateral pleural effusions", f"bilateral {size} pleural effusions"]
            )
        return w.pick([f"{size} {side} pleural effusion", f"{size} {side}-sided pleural effusion"])
    if n == "Pneumothorax":
        size = w.pick(_SIZE[f.severity][:1])
        return w.pick([f"{size} {side} apical pneumothorax", f"{size} {side} pneumothorax"])
    if n == "Consolidation":
        grade = w.pick(_CONSOLIDATION[f.severity])
        options = [
            f"{grade} consolidation in the {f.location}",
            f"{grade} airspace consolidation of the {f.location}",
            f"{grade} consolidation with opacification of the {f.location}",
        ]
        if f.location == "left lower lobe":
            options.append(f"{grade} retrocardiac consolidation in the left lower lobe")
        return w.pick(options)
    if n == "Pneumonia":
        return f"pneumonia in the {f.location}"
    if n == "Edema":
        grade = w.pick(_GRADE[f.severity])
        return w.pick(
            [
                f"{grade} pulmonary edema",
                f"{grade} interstitial pulmonary edema",
                f"{grade} pulmonary edema with vascular congestion",
                f"{grade} pulmonary vascular engorgement and interstitial edema",
                f"{grade} {'diffuse ' if f.severity == 2 else ''}bilateral pulmonary edema",
            ]
        )
    if n == "Atelectasis":
        grade = _ATELECTASIS[f.severity]
        if side == "bilateral":
            return w.pick(
                [
                    f"{grade} bibasilar atelectasis",
                    "plate-like atelectasis at both lung bases",
                    "streaky bibasilar atelectasis",
                ]
            )
        return w.pick(
            [
                f"{grade} {side} basilar atelectasis",
                f"plate-like atelectasis at the {side} lung base",
                f"linear atelectasis in the {side} lower lung",
            ]
        )
    if n == "Cardiomegaly":
        return w.pick(
            [f"{w.pick(_GRADE[f.severity])} cardiomegaly", f"{_ADVERB[f.severity]} enlarged heart"]
        )
    if n == "Enlarged Cardiomediastinum":
        return w.pick(
            ["widening of the mediastinum", "enlargement of the cardiomediastinal silhouette"]
        )
    if n == "Lung Lesion":
        kind = (
            "mass" if f.size_cm >= 3 else w.pick(["nodule", "nodular opacity", "nodular density"])
        )
        return f"{f.size_cm:.1f} cm {kind} in the {side} {f.location} lung"
    if n == "Pleural Other":
        if f.location == "apical":
            return f"{side} apical pleural thickening"
        return f"{side} pleural thickening along the lateral chest wall"
    if n == "Fracture":
        return w.pick(
            [
                f"{side} {_ORDINAL[f.location]} posterior rib fracture",
                f"healing fracture of the {side} {_ORDINAL[f.location]} rib",
            ]
        )
    raise ValueError(f"no phrase for {n!r}")


_DEVICE_SENTENCES = {
    "endotracheal tube": [
        "An endotracheal tube terminates {cm} cm above the carina.",
        "Endotracheal tube tip is {cm} cm above the carina.",
    ],
    "nasogastric tube": [
        "A nasogastric tube courses below the diaphragm with the tip in the stomach.",
        "An enteric tube passes into the stomach.",
    ],
    "right internal jugular catheter": [
        "A right internal jugular central venous catheter terminates in the SVC.",
        "Right IJ venous catheter tip is in the mid SVC.",
    ],
    "left picc": [
        "A left-sided PICC line terminates in the lower SVC.",
        "Left arm PICC with tip in the SVC near the cavoatrial junction.",
    ],
    "pacemaker": [
        "A left chest wall pacemaker is present with leads in the right atrium and ventricle.",
        "Left-sided pacer device with leads terminating in the right atrium and ventricle.",
    ],
    "sternotomy wires": [
        "Median sternotomy wires are intact.",
        "The patient is status post median sternotomy with intact sternal wires.",
    ],
}


def _positive(w: _Writer, f: Finding) -> str:
    """A sentence stating a finding (definite)."""
    if f.name == "Support Devices":
        return w.pick(_DEVICE_SENTENCES[f.location]).format(cm=int(w.rng.integers(3, 7)))
    p = _phrase(w, f)
    plural = p.endswith("effusions")
    if f.name == "Cardiomegaly" and "heart" in p:
        return f"The heart is {p.split()[0]} enlarged."
    if f.name == "Pneumonia":
        return w.pick(
            [
                f"Patchy opacities in the {f.location} are consistent with pneumonia.",
                f"There is {p}.",
                f"{_cap(f.location)} pneumonia.",
            ]
        )
    if f.name == "Pleural Effusion" and f.side != "bilateral" and w.rng.random() < 0.3:
        return f"{_cap(_article(p))} with blunting of the {f.side} costophrenic angle."
    if f.name == "Edema" and w.rng.random() < 0.3:
        return f"Bilateral perihilar haziness is consistent with {p}."
    there = "There are" if plural else "There is"
    bare = (
        p
        if plural
        or f.name
        in (
            "Edema",
            "Cardiomegaly",
            "Pneumonia",
            "Atelectasis",
            "Consolidation",
            "Pleural Other",
            "Enlarged Cardiomediastinum",
        )
        else _article(p)
    )
    if (
        bare.startswith(("widening", "enlargement", "plate-like", "linear"))
        and w.rng.random() < 0.5
    ):
        return f"{_cap(bare)} is noted."
    return w.pick(
        [
            f"{there} {bare}.",
            f"{_cap(bare)} {'are' if plural else 'is'} present.",
            f"{_cap(bare)} {'are' if plural else 'is'} seen.",
        ]
    )


def _hedged(w: _Writer, f: Finding) -> str:
    """A sentence raising a finding as possible only (CheXpert 'uncertain')."""
    p = _phrase(w, f)
    if f.name == "Pneumonia":
        return w.pick(
            [
                f"Patchy opacity in the {f.location} may represent pneumonia.",
                f"Pneumonia in the {f.location} cannot be excluded.",
            ]
        )
    if f.name == "Cardiomegaly":
        return w.pick(
            ["Possible mild cardiomegaly.", "The cardiac silhouette may be mildly enlarged."]
        )
    if f.name == "Atelectasis" and f.side != "bilateral":
        return f"Streaky opacity at the {f.side} base may reflect atelectasis."
    return w.pick(
        [
            f"Possible {p}.",
            f"{_cap(p)} cannot be excluded.",
            f"Findings may represent {p}.",
            f"Questionable {p}.",
        ]
    )


_NEGATIONS = {
    "Pleural Effusion": [
        "No pleural effusion.",
        "There is no pleural effusion.",
        "No pleural effusions are seen.",
    ],
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."],
    "Consolidation": [
        "No focal consolidation.",
        "There is no focal consolidation.",
        "No consolidation is seen.",
    ],
    "Pneumonia": ["No evidence of pneumonia.", "No findings to suggest pneumonia."],
    "Edema": [
        "No pulmonary edema.",
        "There is no pulmonary edema.",
        "No evidence of pulmonary edema or vascular congestion.",
    ],
    "Atelectasis": ["No atelectasis.", "There is no atelectasis."],
    "Cardiomegaly": [
        "The heart size is normal.",
        "Heart size is within normal limits.",
        "No cardiomegaly.",
        "The cardiac silhouette is normal in size.",
    ],
    "Enlarged Cardiomediastinum": [
        "The mediastinal contours are normal.",
        "The mediastinum is not widened.",
    ],
    "Lung Lesion": ["No suspicious pulmonary nodules.", "No pulmonary nodule or mass is seen."],
    "Pleural Other": ["No pleural thickening."],
    "Fracture": ["No acute rib fracture.", "No displaced fracture is seen."],
}
_BOTH = [
    "No pleural effusion or pneumothorax.",
    "There is no pleural effusion or pneumothorax.",
    "No pneumothorax or pleural effusion is seen.",
]


def _state(w: _Writer, f: Finding) -> str:
    return _hedged(w, f) if f.uncertain else _positive(w, f)


def _negations(w: _Writer, spec: StudySpec) -> list[str]:
    negated = list(spec.negated)
    out = []
    if "Pleural Effusion" in negated and "Pneumothorax" in negated and w.rng.random() < 0.7:
        out.append(w.pick(_BOTH))
        negated = [n for n in negated if n not in ("Pleural Effusion", "Pneumothorax")]
    if (
        "Enlarged Cardiomediastinum" in negated
        and "Cardiomegaly" in negated
        and w.rng.random() < 0.5
    ):
        out.append("The cardiomediastinal silhouette is within normal limits.")
        negated = [n for n in negated if n not in ("Enlarged Cardiomediastinum", "Cardiomegaly")]
    out.extend(w.pick(_NEGATIONS[n]) for n in negated)
    return out


def _background(w: _Writer, spec: StudySpec) -> list[str]:
    """Statements about normal anatomy that the spec makes true."""
    present = {f.name for f in spec.findings}
    out = []
    if spec.lungs_clear:
        out.append(
            w.pick(
                [
                    "The lungs are clear.",
                    "Lungs are clear bilaterally.",
                    "No focal parenchymal opacity.",
                ]
            )
        )
    if "Enlarged Cardiomediastinum" not in present and w.rng.random() < 0.3:
        out.append(
            w.pick(
                [
                    "The aortic knob is normal.",
                    "The thoracic aorta and aortic arch are normal.",
                    "The trachea is midline.",
                ]
            )
        )
    if w.rng.random() < 0.25:
        out.append(
            w.pick(
                [
                    "The soft tissues are unremarkable.",
                    "No subcutaneous emphysema.",
                    "Vertebral body heights are preserved in the thoracic spine.",
                ]
            )
        )
    if w.rng.random() < 0.5:
        out.append(w.pick(["The hilar contours are normal.", "The hila are unremarkable."]))
    if "Edema" not in present and w.rng.random() < 0.4:
        out.append(
            w.pick(
                [
                    "The pulmonary vasculature is normal.",
                    "Pulmonary vascularity is within normal limits.",
                ]
            )
        )
    if "Fracture" not in present and w.rng.random() < 0.4:
        out.append(
            w.pick(["The osseous structures are unremarkable.", "Bony structures are intact."])
        )
    if w.rng.random() < 0.3:
        out.append("The visualized upper abdomen is unremarkable.")
    return out


def _views_sentence(w: _Writer, spec: StudySpec) -> str:
    if spec.views[0] == "AP":
        return (
            "Single portable AP view of the chest."
            if len(spec.views) == 1
            else "AP and lateral views of the chest were obtained."
        )
    if len(spec.views) == 1:
        return "Single PA view of the chest."
    return w.pick(
        [
            "PA and lateral views of the chest were obtained.",
            "PA and lateral views of the chest provided.",
        ]
    )


_NORMAL_IMPRESSION = [
    "No acute cardiopulmonary process.",
    "No acute intrathoracic abnormality.",
    "No acute cardiopulmonary abnormality.",
]
_INDICATIONS = ["cough", "shortness of breath", "fever", "chest pain", "dyspnea", "hypoxia"]


def _wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, width=76, initial_indent=" ", subsequent_indent=" "))


def write_report(spec: StudySpec, rng: np.random.Generator) -> str:
    """The report text of a study: header, optional FINDINGS, IMPRESSION."""
    w = _Writer(rng)
    stated = [_state(w, f) for f in spec.findings]
    negations = _negations(w, spec)
    portable = spec.views[0] == "AP"
    exam = "CHEST (PORTABLE AP)" if portable else "CHEST (PA AND LAT)"
    reason = w.pick(["eval for pneumonia", "evaluate for effusion", "assess for acute process"])
    if any(f.name == "Support Devices" for f in spec.findings):
        reason = "assess line and tube placement"
    lines = [
        "                                 FINAL REPORT",
        f" EXAMINATION:  {exam}",
        "",
        f" INDICATION:  ___-year-old {w.pick(['man', 'woman'])} with {w.pick(_INDICATIONS)}"
        f"  // {reason}",
        "",
        f" COMPARISON:  {w.pick(['None.', '___.', 'Chest radiograph from ___.'])}",
        "",
    ]
    pathologic = [f for f in spec.findings if f.name != "Support Devices"]
    if spec.impression_only:
        body = stated + negations
        impression = body if pathologic else [w.pick(_NORMAL_IMPRESSION), *body]
    else:
        findings = stated + negations + _background(w, spec)
        order = w.rng.permutation(len(findings))
        findings = [_views_sentence(w, spec)] + [findings[i] for i in order]
        lines += [" FINDINGS: ", "", _wrap(" ".join(findings)), ""]
        # The impression restates the pathology in fresh words.
        impression = [_state(w, f) for f in pathologic] or [w.pick(_NORMAL_IMPRESSION)]
        if any(f.name in OPACITY_CHILDREN for f in spec.findings) and w.rng.random() < 0.3:
            advice = ["Recommend follow-up radiograph.", "Clinical correlation is recommended."]
            impression = [*impression, w.pick(advice)]
    lines += [" IMPRESSION: ", "", _wrap(" ".join(impression)), ""]
    return "\n".join(lines)
