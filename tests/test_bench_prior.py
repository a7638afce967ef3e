"""`python -m medvlp_jax.bench prior` at tiny sizes, one round: it prints finite positive
times and a ratio, and both sides compute the same loss (each term, the inputs' gradients)
on the same inputs, so the benchmark compares equal work."""

from __future__ import annotations

import json
import math

import pytest
from tinyconfigs import ROOT

from medvlp_jax.bench import prior
from medvlp_jax.methods.prior.method import TERMS


def test_prior_bench_times_equal_work(tmp_path, capsys):
    out = tmp_path / "prior.json"
    config = str(ROOT / "configs/prior.py:tiny")
    returned = prior.main([f"--config={config}", "--repeats=1", "--no-model-step", f"--out={out}"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    for key in ("jax_loss_s", "torch_loss_s", "ratio_jax_over_torch"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert "model_step_s" not in result
    assert "ratio jax / torch" in printed and result["cpu"] in printed
    assert result["counts"]["min"] == 1 and result["counts"]["max"] == 8  # tiny: S = 8
    assert result["loss_jax"] == pytest.approx(result["loss_torch"], rel=1e-4)
    assert result["grad_rel_diff"] < 1e-3  # max |g_jax - g_torch| / max |g_torch| of the inputs
    assert set(result["terms_jax"]) == set(result["terms_torch"]) == set(TERMS)
    for name, value in result["terms_jax"].items():
        assert value == pytest.approx(result["terms_torch"][name], rel=1e-4, abs=1e-6), name
