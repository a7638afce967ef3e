"""Training stages as config data: `train.stages` names them in order, `stages.<name>` holds each.

    c.train.stages = ("global", "local")
    c.stages.global = stage(100)
    c.stages.local = stage(200, optim=dict(lr=1e-5), model=dict(local_weight=1.0))

A stage has its step count and `set`, a partial run config: the fields it changes (optimizer
and schedule, the loss weights or flags the method reads, `optim.groups` for what trains, new
`init` loads). Each stage runs with the run config plus its `set` (stages do not accumulate:
each is the base config + its own `set`), a fresh optimizer state, and a schedule over its own
steps. The trainer's step counter runs on across stages; stage k covers the global steps
(start_k, start_k + num_steps_k]. Parameters carry over at a boundary; parameters that only
the new stage's model has are initialised there.

With `train.stages = ()` a run is one stage named 'main' of `train.num_steps` steps. With
stages, `train.num_steps` must be 0 (then it is set to their total) or equal their total.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from medvlp_jax import config as config_lib
from medvlp_jax.config import ConfigError

# What a stage may not change: the data stream, the mesh and the method are one per run.
FIXED = ("method", "seed", "data", "mesh", "distributed", "train.stages", "stages", "mode")
SINGLE = "main"


def stage(num_steps: int, **sections) -> ml_collections.ConfigDict:
    """A `config.stages.<name>` entry: `num_steps` and the sections it sets, e.g.
    `stage(100, optim=dict(lr=1e-5), model=dict(local_weight=1.0))`."""
    return ml_collections.ConfigDict(
        dict(num_steps=num_steps, set=ml_collections.ConfigDict(sections))
    )


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resolved stage: global steps (start, end] with the run config it trains under."""

    index: int
    name: str
    start: int
    num_steps: int
    config: ml_collections.ConfigDict

    @property
    def end(self) -> int:
        return self.start + self.num_steps

    def meta(self) -> dict:
        """What a checkpoint records of its stage."""
        return {"stage": self.name, "stage_index": self.index, "stage_start": self.start}


def _apply_set(config: ml_collections.ConfigDict, name: str, updates) -> ml_collections.ConfigDict:
    """A copy of `config` with the leaves of `updates` (a partial config) assigned."""
    out = ml_collections.ConfigDict(config.to_dict())
    for path in config_lib.leaf_paths(updates):
        where = f"config.stages.{name}.set.{path}"
        if any(path == f or path.startswith(f + ".") for f in FIXED):
            raise ConfigError(f"{where}: a stage cannot change {path.split('.')[0]}")
        parent, _, leaf = path.rpartition(".")
        try:
            node = config_lib.lookup(out, parent) if parent else out
            current = node[leaf]
        except KeyError:
            hint = config_lib.closest_key(config, path)
            raise ConfigError(
                f"{where}: no such config field {path}"
                + (f"; did you mean {hint}?" if hint else "")
            ) from None
        value = config_lib.lookup(updates, path)
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"{where} is a section; set one of its fields")
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        node[leaf] = value
    return out


def resolve(config: ml_collections.ConfigDict) -> list[Stage]:
    """The run's stages in order (checks names, step counts and what each stage sets)."""
    names = tuple(config.train.stages)
    if not names:
        return [Stage(0, SINGLE, 0, config.train.num_steps, config)]
    known = sorted(config.get("stages", {}))
    result, start = [], 0
    for index, name in enumerate(names):
        if name not in known:
            raise ConfigError(
                f"config.train.stages names {name!r}, which config.stages lacks (has {known})"
            )
        spec = config.stages[name]
        if spec.num_steps < 1:
            raise ConfigError(f"config.stages.{name}.num_steps={spec.num_steps}; expected >= 1")
        stage_config = _apply_set(config, name, spec.set)
        stage_config.train.num_steps = spec.num_steps
        result.append(Stage(index, name, start, spec.num_steps, stage_config))
        start += spec.num_steps
    if config.train.num_steps not in (0, start):
        raise ConfigError(
            f"config.train.num_steps={config.train.num_steps} but the stages "
            f"{list(names)} add up to {start}; set it to 0 (their total) or {start}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"config.train.stages={names} names a stage twice")
    return result


def total_steps(stages: list[Stage]) -> int:
    return stages[-1].end


def stage_of(stages: list[Stage], step: int) -> Stage:
    """The stage whose optimizer produced the state at `step` (0 -> the first stage)."""
    for s in stages:
        if step <= s.end:
            return s
    return stages[-1]
