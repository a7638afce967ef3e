"""One weight-loading path: the named loads of `config.init`, applied at a stage's start.

`config.init.<name>` is a `load_spec(...)`. Loads run in the order of their `order` field,
then of their names, a later one overwriting an earlier one where both write (the base
config's `init.checkpoint`, a warm start from another run, has order 1: after the towers'
loads). Each load reads a tree of '/'-joined paths from its source, renames them with `map`,
puts them under `into` and overwrites those leaves of the freshly initialised variables
(params, and batch-norm running statistics where the source has them):

- `source`:
  - an Orbax run of this library: a workdir, its `checkpoints/` folder or one step's folder
    (its latest step; params and `batch_stats`);
  - `run:<name>`: the run `config.prerequisites.<name>` describes (see `prerequisites`);
  - a Hugging Face folder (`config.json` with `model_type` + `model.safetensors`), `minilm`
    (the packaged all-MiniLM-L6-v2), or a torchvision ResNet-50 state dict saved as
    `.safetensors`: these are converted into one of the method's own modules, so `into` must
    name an entry of `method.importers()` (e.g. 'image', 'text', 'backbone').
- `into`: the destination subtree ('' = the whole model).
- `map`: ("SRC_REGEX -> DST", ...) rewrites source paths before they go under `into`; the first
  row whose regex fullmatches wins (`DST` may use `\\1`); a row with no `DST`
  ("SRC_REGEX ->") skips the paths it matches on purpose (e.g. the other tower of a two-tower
  run); a source path no row matches is dropped and counts as unexpected when strict.
  Empty: paths are kept as they are.
- `dont_load`: regexes over destination paths (relative to the model root) that keep their
  fresh initialisation.
- `strict`: every destination leaf under `into` must be loaded (or be `dont_load`) and every
  source leaf must land on an existing parameter of the same shape; otherwise the error lists
  the missing and unexpected keys. Not strict: the mismatches are logged and skipped (a shape
  mismatch is always an error).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from medvlp_jax import checkpointing
from medvlp_jax.config import ConfigError
from medvlp_jax.optim import param_paths
from medvlp_jax.parallel.sharding import strip_boxes

# The collections a load may write (those a train state saves).
COLLECTIONS = tuple(checkpointing.VARIABLE_ITEMS)
RUN_PREFIX = "run:"
ARROW = "->"

Flat = dict[str, dict[str, object]]  # collection -> path -> leaf


def load_spec(
    source: str = "",
    into: str = "",
    map: tuple[str, ...] = (),
    dont_load: tuple[str, ...] = (),
    strict: bool = True,
    order: int = 0,
) -> ml_collections.ConfigDict:
    """One `config.init.<name>` entry (see the module docstring); `source=''` loads nothing."""
    return ml_collections.ConfigDict(
        dict(
            source=source,
            into=into,
            map=tuple(map),
            dont_load=tuple(dont_load),
            strict=strict,
            order=order,
        )
    )


def load_order(init_cfg: ml_collections.ConfigDict) -> list[str]:
    """The names of `init_cfg`'s loads in the order they run."""
    return sorted(init_cfg, key=lambda name: (init_cfg[name].order, name))


def loads_writing(init_cfg: ml_collections.ConfigDict, subtree: str) -> list[str]:
    """The loads (in `load_order`) that can write under `subtree`: every destination of a
    load lies under its `into`, so those whose `into` is the root, `subtree` or inside it."""
    intos = {name: init_cfg[name].into for name in init_cfg}
    return [
        name
        for name in load_order(init_cfg)
        if not intos[name] or intos[name] == subtree or intos[name].startswith(subtree + "/")
    ]


def flatten(variables: dict) -> Flat:
    """{'params': tree, ...} -> {'params': {'a/b/kernel': leaf}, ...} (loadable collections)."""
    return {
        name: dict(
            zip(
                jax.tree.leaves(param_paths(tree)),
                jax.tree.leaves(tree),
                strict=True,
            )
        )
        for name, tree in variables.items()
        if name in COLLECTIONS
    }


def _join(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix and path else prefix or path


def _parse_map(name: str, rows) -> list[tuple[re.Pattern, str]]:
    parsed = []
    for i, row in enumerate(rows):
        src, arrow, dst = row.partition(ARROW)
        if not arrow:
            raise ConfigError(f"config.init.{name}.map[{i}]={row!r}: expected 'SRC_REGEX -> DST'")
        try:
            parsed.append((re.compile(src.strip()), dst.strip()))
        except re.error as e:
            raise ConfigError(f"config.init.{name}.map[{i}]={row!r}: bad regex ({e})") from None
    return parsed


SKIP = ""  # the renamed path of a source leaf a map row skips on purpose


def _rename(path: str, rows: list[tuple[re.Pattern, str]]) -> str | None:
    """The path after the first matching row (`SKIP` for a row without a destination), or
    None when no row matches."""
    if not rows:
        return path
    for pattern, template in rows:
        if pattern.fullmatch(path):
            return pattern.sub(template, path, count=1) if template else SKIP
    return None


def _read_run(source: str, what: str) -> Flat:
    """Every loadable leaf of an Orbax run's latest (or given) step, as host arrays."""
    return flatten(checkpointing.read_variables(checkpointing.find_state_dir(source, what)))


def _read_foreign(name: str, spec, method) -> Flat:
    importers = method.importers()
    if spec.into not in importers:
        raise ConfigError(
            f"config.init.{name}: source {spec.source!r} is a foreign checkpoint, so "
            f"config.init.{name}.into must name one of this method's importable modules "
            f"{sorted(importers)} (got {spec.into!r})"
        )
    return flatten(importers[spec.into](spec.source))


def _is_orbax(source: str) -> bool:
    path = Path(source).expanduser()
    if not path.is_dir():
        return False
    meta = path / "config.json"
    return not (meta.is_file() and "model_type" in json.loads(meta.read_text()))  # HF folder


def read_source(name: str, spec, method, resolve_run: Callable[[str], Path]) -> Flat:
    """The source tree of load `name` (paths relative to the source's root)."""
    source = spec.source
    what = f"config.init.{name}.source={source}"
    if source.startswith(RUN_PREFIX):
        return _read_run(str(resolve_run(source[len(RUN_PREFIX) :])), what)
    if (
        source != "minilm"
        and not source.endswith(".safetensors")
        and not Path(source).expanduser().exists()
    ):
        raise FileNotFoundError(f"{what}: no such folder or file")
    if _is_orbax(source):
        return _read_run(source, what)
    return _read_foreign(name, spec, method)


def plan(name: str, spec, source: Flat, target: Flat) -> tuple[Flat, list[str], list[str]]:
    """Where each source leaf goes: (loaded {collection: {dst path: array}}, missing,
    unexpected). `target` holds the destination leaves (arrays or ShapeDtypeStructs)."""
    rows = _parse_map(name, spec.map)
    keep_out = [re.compile(p) for p in spec.dont_load]
    loaded: Flat = {}
    unexpected = []
    for collection, leaves in source.items():
        for path, value in leaves.items():
            renamed = _rename(path, rows)
            if renamed == SKIP:
                continue
            dst = None if renamed is None else _join(spec.into, renamed)
            if dst is not None and any(p.fullmatch(dst) for p in keep_out):
                continue
            want = target.get(collection, {}).get(dst)
            if want is None:
                unexpected.append(f"{collection}/{path}")
                continue
            if tuple(np.shape(value)) != tuple(want.shape):
                raise checkpointing.CheckpointMismatchError(
                    f"config.init.{name} ({spec.source}): {collection}/{path} has shape "
                    f"{tuple(np.shape(value))}, {collection}/{dst} needs {tuple(want.shape)}"
                )
            loaded.setdefault(collection, {})[dst] = np.asarray(value, dtype=want.dtype)
    prefix = spec.into
    missing = [
        f"{collection}/{path}"
        for collection, leaves in target.items()
        if collection in source or collection == "params"
        for path in leaves
        if (not prefix or path == prefix or path.startswith(prefix + "/"))
        and path not in loaded.get(collection, {})
        and not any(p.fullmatch(path) for p in keep_out)
    ]
    return loaded, missing, unexpected


def _check(name: str, spec, missing: list[str], unexpected: list[str]) -> None:
    if not missing and not unexpected:
        return
    message = (
        f"config.init.{name} ({spec.source}) does not fit this model: "
        f"missing from the source: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
        f"unexpected in the source: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
    )
    if spec.strict:
        raise checkpointing.CheckpointMismatchError(
            message + f" (set config.init.{name}.map / .dont_load, or .strict=false)"
        )
    logging.warning("%s; loading the rest (strict=false)", message)


def loaded_leaves(
    init_cfg: ml_collections.ConfigDict,
    target: Flat,
    method,
    resolve_run: Callable[[str], Path],
    names: list[str] | None = None,
) -> tuple[Flat, list[str]]:
    """Runs the loads `names` (default: all, in `load_order`) against `target` (flat destination
    leaves). Returns ({collection: {path: host array}}, one summary line per load)."""
    out: Flat = {}
    summary = []
    for name in load_order(init_cfg) if names is None else names:
        spec = init_cfg[name]
        if not spec.source:
            continue
        source = read_source(name, spec, method, resolve_run)
        loaded, missing, unexpected = plan(name, spec, source, target)
        _check(name, spec, missing, unexpected)
        for collection, leaves in loaded.items():
            out.setdefault(collection, {}).update(leaves)
        n = sum(len(v) for v in loaded.values())
        summary.append(f"init.{name}: {n} arrays from {spec.source} into '{spec.into or '/'}'")
    return out, summary


def overwrite(variables: dict, loaded: Flat) -> dict:
    """`variables` with the leaves of `loaded` replaced (same structure; host or device)."""
    out = dict(variables)
    for collection, leaves in loaded.items():
        paths = param_paths(variables[collection])
        out[collection] = jax.tree.map(
            lambda path, leaf, new=leaves: new.get(path, leaf), paths, variables[collection]
        )
    return out


def run_resolver(config: ml_collections.ConfigDict) -> Callable[[str], Path]:
    """`name -> folder` of the prerequisite runs of `config` ('run:<name>' sources)."""
    from medvlp_jax import prerequisites

    return lambda name: prerequisites.run_dir(config, name)


def changed_loads(previous: ml_collections.ConfigDict | None, current) -> list[str]:
    """The loads of `current` that a stage must run: all at the first stage, else the ones
    that are new or differ from the previous stage's."""
    names = load_order(current)
    if previous is None:
        return names
    return [n for n in names if n not in previous or previous[n].to_dict() != current[n].to_dict()]


def run_variables(method, workdir: Path, example: dict) -> dict:
    """`{'params'[, 'batch_stats']}` (host arrays) of `method`'s run in `workdir`, its latest
    checkpoint, loaded strictly; `example` is a batch (arrays or `ShapeDtypeStruct`s) fixing
    the input shapes."""
    abstract = strip_boxes(jax.eval_shape(method.init, jax.random.PRNGKey(0), example))
    abstract = {k: v for k, v in abstract.items() if k in COLLECTIONS}
    whole_run = ml_collections.ConfigDict({"run": load_spec(str(workdir))})
    loaded, _ = loaded_leaves(whole_run, flatten(abstract), method, run_resolver(method.config))
    return overwrite(abstract, loaded)
