"""Pieces of the train-step benchmark that need no model (the benchmark itself is run by hand:
`python -m medvlp_jax.bench step`; an end-to-end run costs ~40 s of imports and compiles)."""

import argparse

import pytest

from medvlp_jax.bench import step


def test_xla_options_parse_types():
    assert step.xla_options(["a=true", "b=3", "c=LIBRARY_FUSION_TYPE_DOT"]) == {
        "a": True,
        "b": 3,
        "c": "LIBRARY_FUSION_TYPE_DOT",
    }
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        step.xla_options(["oops"])


def test_analytic_matmul_flops_by_hand():
    """One layer, width 2, batch 1: dense 2*T*(4*4 + 2*2*8) + attention 4*T*T*2, times 3."""
    a = argparse.Namespace(
        width=2, layers=1, batch=1, image_size=2, patch=1, text_len=3, embed_dim=1,
        vision_heads=1, text_heads=1,
    )  # fmt: skip
    flops = step.matmul_flops(a)
    text = 3 * (2 * 3 * (16 + 32) + 4 * 9 * 2)
    vision = 3 * (2 * 5 * (16 + 32) + 4 * 25 * 2 + 2 * 4 * 3 * 2)
    assert flops["text"] == text and flops["vision"] == vision
    assert flops["heads_and_loss"] == 3 * (4 * 2 + 4)
