"""Downstream segmentation: `python -m medvlp_jax.downstream --task=segmentation[:tiny]`.
Fields and presets: medvlp_jax/downstream/config.py."""

from medvlp_jax.downstream.config import task_config


def get_config(arg: str = ""):
    return task_config("segmentation", arg)
