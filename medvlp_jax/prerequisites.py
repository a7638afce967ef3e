"""Runs a run needs before it starts: `config.prerequisites.<name>` is a complete run config.

MCPL's frozen backbone is one: `config.prerequisites.backbone` is a configs/clip.py run, and
`init.backbone.source = 'run:backbone'` loads its weights. Before training, the trainer calls
`ensure` for every prerequisite some `init` load reads: one that has not finished is trained
into `<cache>/runs/<name>-<hash>` (`run_dir`: the hash covers what decides the weights) with
`train.run`, the code path of `main`, so an interrupted pre-training resumes and a finished
one is reused by every later run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import ml_collections

from medvlp_jax import config as config_lib
from medvlp_jax.config import ConfigError
from medvlp_jax.data.config import default_data_config, resolve_cache_dir
from medvlp_jax.models.builders import BATCH_NORM_FIELDS

# Model fields added after the first cached runs, with the default that changes nothing.
LATER_FIELDS = dict(BATCH_NORM_FIELDS)
# Data fields that say where data lives and how it loads, not what the weights learn from.
_DATA_LOCATION = ("cache_dir", "num_workers", "prefetch")


def run_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The prerequisite's run config, reading data from the same cache as `config`."""
    known = sorted(config.prerequisites)
    if name not in known:
        raise ConfigError(f"'run:{name}' names no entry of config.prerequisites (has {known})")
    run_cfg = ml_collections.ConfigDict(config.prerequisites[name].to_dict())
    run_cfg.data.cache_dir = config.data.cache_dir
    return run_cfg


def run_dir(config: ml_collections.ConfigDict, name: str) -> Path:
    """`<cache>/runs/<name>-<hash>`: sha1 over the prerequisite's method, seed, model, optim,
    stages, step count, compute dtype and data (the fields `_data_key` keeps); evaluation,
    logging and checkpoint settings do not count."""
    run = config.prerequisites[name].to_dict()
    key = {
        **{k: run[k] for k in ("method", "seed", "optim", "stages")},
        "model": _without_later_defaults(run["model"]),
        "num_steps": run["train"]["num_steps"],
        "train_stages": run["train"]["stages"],
        "compute_dtype": run["train"]["compute_dtype"],
        "data": _data_key(run["data"]),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return resolve_cache_dir(config.data.cache_dir) / "runs" / f"{name}-{digest[:12]}"


def _data_key(data: dict) -> dict:
    """The data fields that decide the weights: less where the data lives and how it loads,
    and less the fields at their default, so that a data option added later (at a default
    that changes nothing) leaves the hashes of existing runs alone."""
    defaults = default_data_config().to_dict()
    return {
        k: v
        for k, v in data.items()
        if k not in _DATA_LOCATION and (k not in defaults or _plain(v) != _plain(defaults[k]))
    }


def _without_later_defaults(tree):
    """`tree` without the tower fields added after runs were first cached (`LATER_FIELDS`)
    where they hold their default, so that those runs keep their hashes."""
    if not isinstance(tree, dict):
        return tree
    return {
        k: _without_later_defaults(v)
        for k, v in tree.items()
        if not (k in LATER_FIELDS and _plain(v) == _plain(LATER_FIELDS[k]))
    }


def _plain(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def finished(run_cfg: ml_collections.ConfigDict, folder: Path) -> bool:
    """Whether the run in `folder` has its final checkpoint."""
    from medvlp_jax import stages

    last = stages.total_steps(stages.resolve(run_cfg))
    return (folder / "checkpoints" / str(last)).is_dir()


def ensure(config: ml_collections.ConfigDict, name: str) -> Path:
    """Trains prerequisite `name` unless it has finished; returns its run folder."""
    from medvlp_jax import train  # the trainer calls this module

    folder = run_dir(config, name)
    run_cfg = run_config(config, name)
    if finished(run_cfg, folder):
        return folder
    print(
        f"prerequisite '{name}' ({run_cfg.method}) is not in the cache ({folder}): "
        "training it first",
        flush=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (folder / "config.json").write_text(config_lib.to_json(run_cfg))
    train.run(run_cfg, folder)
    if not finished(run_cfg, folder):
        raise RuntimeError(
            f"prerequisite '{name}' in {folder} stopped before its last step; run again to "
            "resume it"
        )
    print(f"prerequisite '{name}' ready in {folder}", flush=True)
    return folder
