"""Downstream detection: `python -m medvlp_jax.downstream --task=detection[:tiny]`.
Fields and presets: medvlp_jax/downstream/config.py."""

from medvlp_jax.downstream.config import task_config


def get_config(arg: str = ""):
    return task_config("detection", arg)
