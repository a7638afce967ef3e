"""The record type every data source produces, and the CheXpert label vocabulary."""

from __future__ import annotations

import dataclasses

import numpy as np

# The 14 CheXpert observations in the order of the CheXpert paper (Irvin et al., 2019).
CHEXPERT_CLASSES: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# The classes of the balanced zero-shot benchmark ("5x200").
FIVE_CLASSES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)

FRONTAL_VIEWS: frozenset[str] = frozenset({"PA", "AP"})
# Every view position of MIMIC-CXR-JPG's metadata ('' = not recorded); a view outside it
# (a typo, another dataset's spelling such as 'Frontal') is a table problem, since the
# frontal filter would drop its rows without a word.
KNOWN_VIEWS: frozenset[str] = frozenset(
    {
        "",
        "PA",
        "AP",
        "LATERAL",
        "LL",
        "AP AXIAL",
        "AP LLD",
        "AP RLD",
        "PA LLD",
        "PA RLD",
        "LAO",
        "RAO",
        "LPO",
        "SWIMMERS",
        "XTABLE LATERAL",
    }
)


def missing_labels() -> np.ndarray:
    """Labels of a record without annotations: float32 [14], all NaN."""
    return np.full(len(CHEXPERT_CLASSES), np.nan, np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Record:
    """One image-text pair.

    Attributes:
      image_path: absolute path of the image (JPEG/PNG/DICOM).
      text: the selected report text (already section-selected).
      labels: float32 [14] raw CheXpert values in `CHEXPERT_CLASSES` order:
        1 positive, 0 negative, -1 uncertain, NaN not mentioned / unknown.
      study_id, subject_id: identifiers ('' when the source has none).
      view: view position ('PA', 'AP', 'LATERAL', ...; '' when unknown).
    """

    image_path: str
    text: str
    labels: np.ndarray
    study_id: str = ""
    subject_id: str = ""
    view: str = ""

    def __post_init__(self):
        labels = np.asarray(self.labels, np.float32)
        if labels.shape != (len(CHEXPERT_CLASSES),):
            raise ValueError(
                f"Record {self.image_path}: labels must have shape [14], got {labels.shape}"
            )
        object.__setattr__(self, "labels", labels)
