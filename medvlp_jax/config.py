"""The base run configuration and its validation.

Every file in `configs/` starts from `base_config()` and sets the method's own fields. The
config is locked before command-line overrides are applied, so a misspelt key fails at start,
and `check_overrides` fails even earlier with the closest valid key in the message.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections

from medvlp_jax.data import reports
from medvlp_jax.data.config import default_data_config
from medvlp_jax.parallel.distributed import default_distributed_config


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


# Fields whose value must come from a fixed set; checked by `check_choices`.
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("train", "eval", "data"),
    "data.train_text": reports.TRAIN_TEXTS,
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("constant", "cosine", "linear", "cosine_restarts"),
    "train.compute_dtype": ("float32", "bfloat16"),
    "train.keep_best_mode": ("max", "min"),
}


def _load_spec() -> ml_collections.ConfigDict:
    from medvlp_jax.weights import load_spec  # weights imports this module

    return load_spec(order=1)


def base_config() -> ml_collections.ConfigDict:
    """Returns the fields every run has; method configs fill in `method` and `model`."""
    c = ml_collections.ConfigDict()
    c.method = "clip"
    c.mode = "train"  # train | eval (evaluate a checkpoint, train nothing) | data
    c.eval_step = -1  # mode=eval: the checkpoint step to evaluate (-1: the latest)
    c.seed = 0
    c.data = default_data_config()
    c.model = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0  # optimizer updates, as restart_period (see grad_accum_steps)
    c.optim.warmup_init_lr = 0.0
    c.optim.end_lr = 0.0
    c.optim.restart_period = 1000
    c.optim.clip_grad_norm = 1.0
    c.optim.grad_accum_steps = 1
    # Ordered rows "REGEX -> frozen" | "REGEX -> lr=F wd=G" over '/'-joined parameter paths,
    # after the method's own rows; first match wins (see medvlp_jax/optim.py).
    c.optim.groups = ()
    c.optim.no_decay = (r".*bias$", r".*(norm|ln|layernorm|bn|LayerNorm|BatchNorm).*/scale$")

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.log_every = 10
    c.train.eval_every = 500
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.train.keep_best_metric = ""  # e.g. "eval/synthcxr/zero_shot_acc"; "" = keep last only
    c.train.keep_best_mode = "max"  # "max" (accuracy, AUROC) or "min" (a loss)
    c.train.compute_dtype = "float32"
    c.train.profile = False
    # Before each evaluation, re-estimate batch-norm running statistics at the current weights
    # from this many training batches (0: off); see medvlp_jax/batch_stats.py.
    c.train.refresh_batch_stats = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.strategy = ""  # "" | "dp" | "fsdp" | "fsdp_tp": preset that overrides the axes

    # Named weight loads (medvlp_jax/weights.py), run in `order` then name order at the first
    # stage's start (and at a later stage's start for the loads it adds or changes).
    # `checkpoint` warm-starts from another run of this library (its latest checkpoint):
    # --config.init.checkpoint.source=DIR
    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = _load_spec()

    # Training stages (medvlp_jax/stages.py): `train.stages` names them in order, and
    # `stages.<name>` holds each one's num_steps and the config fields it sets.
    c.train.stages = ()
    c.stages = ml_collections.ConfigDict()
    # Runs this run needs first (medvlp_jax/prerequisites.py): `prerequisites.<name>` is a full
    # run config, trained into the cache by the same code path as `main`; `init.<x>.source`
    # 'run:<name>' loads its weights.
    c.prerequisites = ml_collections.ConfigDict()

    # Evaluators (medvlp_jax/evaluation/__init__.py): `evals.<name>` = type (a module of
    # medvlp_jax.evaluation), enabled, optional pred ({role: predict function}, default: the
    # type's PRED) and the type's fields. Keys: eval/<data.source>/<metric>, with /<name>
    # before <metric> when the name is not the type's. A second eval of a type: copy one
    # (`c.evals.retrieval_all = c.evals.retrieval.copy_and_resolve_references()`) and edit it.
    c.evals = ml_collections.ConfigDict()
    c.evals.zero_shot = ml_collections.ConfigDict()
    c.evals.zero_shot.type = "zero_shot"
    c.evals.zero_shot.enabled = True
    c.evals.zero_shot.classes = ()  # () = the data's zero-shot classes (sources.ZERO_SHOT_CLASSES)
    c.evals.zero_shot.templates = ("{}", "findings consistent with {}", "there is {}")
    c.evals.retrieval = ml_collections.ConfigDict()
    c.evals.retrieval.type = "retrieval"
    c.evals.retrieval.enabled = True
    c.evals.retrieval.max_examples = 1000
    c.evals.retrieval.rerank_k = 0  # > 0: pred.pair re-ranks the embeddings' top-k
    # Class Precision@K both ways on the zero-shot (5x200) set, with embeddings; () = off
    # (sources without a zero-shot list, e.g. ROCO without data.zero_shot_csv).
    c.evals.retrieval.precision_at = (1, 5, 10)
    c.evals.linear_probe = ml_collections.ConfigDict()
    c.evals.linear_probe.type = "linear_probe"
    c.evals.linear_probe.enabled = True
    c.evals.linear_probe.fractions = (0.01, 0.1, 1.0)
    c.evals.linear_probe.steps = 300
    c.evals.linear_probe.max_train_examples = 2000
    c.evals.linear_probe.l2_grid = (1e-4, 1e-2, 1.0)  # chosen on the validate split

    c.distributed = default_distributed_config()

    # `python -m medvlp_jax.bench quality` runs the config once per variant:
    # "name:key=value;key=value" (overrides as on the command line, without --config.).
    c.bench = ml_collections.ConfigDict()
    c.bench.variants = ()
    return c


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Yields every leaf field as a dotted path, e.g. 'data.batch_size'."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaf_paths(value, path + ".")
        else:
            yield path


def closest_key(config: ml_collections.ConfigDict, path: str) -> str | None:
    """The valid dotted path closest to `path` (by full path, then by last component)."""
    paths = list(leaf_paths(config))
    match = difflib.get_close_matches(path, paths, n=1, cutoff=0.6)
    if match:
        return match[0]
    by_leaf = {p.rsplit(".", 1)[-1]: p for p in paths}
    match = difflib.get_close_matches(path.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[match[0]] if match else None


def lookup(config: ml_collections.ConfigDict, path: str):
    node = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _check_value(path: str, current, text: str) -> None:
    """Raises ConfigError when `text` cannot become the type of the field's `current` value."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"--config.{path}={text}: expected a bool (true/false)")
    elif isinstance(current, int):
        try:
            int(text)
        except ValueError:
            raise ConfigError(f"--config.{path}={text}: expected an int") from None
    elif isinstance(current, float):
        try:
            float(text)
        except ValueError:
            raise ConfigError(f"--config.{path}={text}: expected a float") from None


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
    """Fails on `--config.KEY=VALUE` overrides whose key does not exist or value has the
    wrong type, naming the closest valid key."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path, _, text = arg[len("--config.") :].partition("=")
        try:
            current = lookup(config, path)
        except KeyError:
            hint = closest_key(config, path)
            suggestion = f"; did you mean --config.{hint}?" if hint else ""
            raise ConfigError(f"unknown config key --config.{path}{suggestion}") from None
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{path} is a section; set one of its fields")
        if "=" in arg:
            _check_value(path, current, text)


def _parse(current, text: str):
    """`text` as the type of the field's `current` value (tuples: comma-separated)."""
    if isinstance(current, bool):
        return text.lower() in ("true", "1")
    if isinstance(current, tuple):
        return tuple(type(current[0])(t) if current else t for t in text.split(",") if t)
    return type(current)(text) if current is not None else text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]):
    """Returns a copy of `config` with "a.b=value" overrides applied (checked like the CLI's)."""
    check_overrides(config, [f"--config.{o}" for o in overrides])
    config = ml_collections.ConfigDict(config.to_dict())
    for override in overrides:
        path, _, text = override.partition("=")
        parent, _, leaf = path.rpartition(".")
        node = lookup(config, parent) if parent else config
        node[leaf] = _parse(node[leaf], text)
    return config


def check_choices(config: ml_collections.ConfigDict) -> None:
    """Fails when an enumerated field holds a value outside its choices."""
    for path, allowed in CHOICES.items():
        value = lookup(config, path)
        if value not in allowed:
            raise ConfigError(f"config.{path}={value!r}; expected one of {allowed}")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` as `config_flags` does, calling `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config={spec}: no such config file {path}")
    module_spec = importlib.util.spec_from_file_location(f"_medvlp_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (tuples become lists); `configs/replay.py` reads it back."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `to_json`, restoring tuples where the base config has tuples."""

    def tuplify(value):
        if isinstance(value, list):
            return tuple(tuplify(v) for v in value)
        if isinstance(value, dict):
            return {k: tuplify(v) for k, v in value.items()}
        return value

    return ml_collections.ConfigDict(tuplify(json.loads(text)))
