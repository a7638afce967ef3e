"""Replays a finished run: `--config=configs/replay.py:WORKDIR/config.json`."""

from pathlib import Path

from medvlp_jax.config import from_json


def get_config(path: str):
    return from_json(Path(path).read_text())
