"""SynthCXR: an embedded, procedurally generated chest X-ray dataset with reports.

Images and reports are rendered from one sampled study description, so what a report says
is true of its image (sides, lobes, sizes), and the tree is written in the MIMIC-CXR-JPG
layout so that the MIMIC loader reads it. See `generate` for the layout.
"""

from medvlp_jax.data.synthcxr.dataset import (
    BOXES_CSV,
    CHEXPERT_CSV,
    GENERATOR_VERSION,
    INFO_JSON,
    METADATA_CSV,
    SPLIT_CSV,
    ZERO_SHOT_CSV,
    default_zero_shot_per_class,
    ensure_synthcxr,
    generate,
    read_masks,
    tree_name,
)

__all__ = [
    "BOXES_CSV",
    "CHEXPERT_CSV",
    "GENERATOR_VERSION",
    "INFO_JSON",
    "METADATA_CSV",
    "SPLIT_CSV",
    "ZERO_SHOT_CSV",
    "default_zero_shot_per_class",
    "ensure_synthcxr",
    "generate",
    "read_masks",
    "tree_name",
]
