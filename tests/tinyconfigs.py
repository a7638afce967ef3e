"""The tiny configs tests train: `configs/<method>.py:tiny` with overrides, evaluators off."""

from __future__ import annotations

import sys
from pathlib import Path

from medvlp_jax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
NO_EVAL = (
    "evals.zero_shot.enabled=false",
    "evals.retrieval.enabled=false",
    "evals.linear_probe.enabled=false",
)


def tiny(method: str, *overrides: str):
    """`configs/<method>.py:tiny` with the evaluators off, then `overrides` ("a.b=value")."""
    config = config_lib.load_config_file(str(ROOT / f"configs/{method}.py:tiny"))
    return config_lib.apply_overrides(config, [*NO_EVAL, *overrides])


def tiny_clip(*overrides: str):
    return tiny("clip", *overrides)


def cli(workdir, *overrides: str, config: str = "configs/clip.py:tiny") -> list[str]:
    """The command line of a run (overrides without the `--config.` prefix; run it with
    cwd=ROOT)."""
    return [
        sys.executable,
        "-m",
        "medvlp_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *[f"--config.{o}" for o in overrides],
    ]
