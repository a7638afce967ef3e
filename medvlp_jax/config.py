"""The base run configuration and its validation.

Every file in `configs/` starts from `base_config()` and sets the method's own fields. The
config is locked before command-line overrides are applied, so a misspelt key fails at start,
and `check_overrides` fails even earlier with the closest valid key in the message.
`validate` then checks the values (`CHOICES`, `RANGES`) before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections

from medvlp_jax.data import reports
from medvlp_jax.data.config import default_data_config
from medvlp_jax.parallel.distributed import JAX_CLUSTER_METHODS, default_distributed_config


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


# Fields whose value must come from a fixed set; checked by `check_choices`. In a path, `*`
# stands for any one key (`evals.*.split`: every evaluator's); a field the config lacks
# (another method's) is skipped. Most tuples copy constants of the modules that read the
# field, which import jax (this module must not): tests/reliability/test_config.py keeps
# them equal.
CHOICES: dict[str, tuple] = {
    "mode": ("train", "eval", "data"),
    "data.source": ("synthcxr", "mimic", "roco", "manifest"),
    "data.section_mode": reports.SECTION_MODES,
    "data.train_text": reports.TRAIN_TEXTS,
    "data.uncertain_policy": ("ones", "zeros", "ignore"),
    "data.on_bad_record": ("skip", "error"),
    "data.image_check": ("header", "decode"),
    "data.on_bad_csv": ("error", "warn"),
    "data.channels": (1, 3),
    "mesh.strategy": ("", "dp", "fsdp", "fsdp_tp"),
    "distributed.auto_detect": ("auto", "off", *JAX_CLUSTER_METHODS),
    "distributed.cpu_collectives": ("gloo", "mpi"),
    "evals.*.split": ("train", "validate", "test"),
    "evals.*.label_mode": ("multilabel", "multiclass"),
    "downstream.task": ("classification", "segmentation", "detection"),
    "downstream.label_mode": ("multilabel", "multiclass"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("constant", "cosine", "linear", "cosine_restarts"),
    "train.compute_dtype": ("float32", "bfloat16"),
    "train.keep_best_mode": ("max", "min"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.on_bad_checkpoint": ("fallback", "error"),
    # Towers (medvlp_jax/models/builders.py) and method-specific model fields.
    "model.image.name": ("vit", "resnet50"),
    "model.text.name": ("bert", "roberta", "clip_text"),
    "model.*.layout": ("clip", "hf"),
    "model.*.stem": ("patch", "resnet"),
    "model.*.activation": ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu"),
    "model.*.dtype": ("", "float32", "bfloat16"),
    "model.*.param_dtype": ("float32", "bfloat16"),
    "model.*.bn_stats": ("global", "per_device"),
    "model.bn_stats": ("global", "per_device"),
    "model.loss": ("clip", "siglip"),
    "model.text_pooling": ("mean", "first", "pooled"),
    "model.orth_batch": ("global", "per_device"),
    "model.prompt_config": ("qk_v", "splice"),
    "model.eval_image_keywords": ("report", "predicted"),
    "model.prompt_similarity": ("dot", "cosine"),
}


@dataclasses.dataclass(frozen=True)
class Bound:
    """The numbers a field may hold: from `low` to `high` (either end excluded when `*_open`),
    or `special` (e.g. -1 = automatic), with a `note` on what the special values mean."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    special: int | None = None
    note: str = ""

    def admits(self, value) -> bool:
        """Whether the number `value` is within the bound (or the special value)."""
        if value == self.special:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            left, right = "(["[not self.low_open], ")]"[not self.high_open]
            text = f"a number in {left}{self.low:g}, {self.high:g}{right}"
        if self.special is not None:
            text = f"{self.special} or {text}"
        return text + (f" ({self.note})" if self.note else "")


_COUNT = Bound(1)  # a count or an interval in steps: at least 1
_NON_NEGATIVE = Bound(0)
_AXIS = Bound(1, special=-1, note="-1: the remaining devices")

# Numeric fields and the values they admit; checked by `check_ranges` (paths as in CHOICES).
RANGES: dict[str, Bound] = {
    "eval_step": Bound(0, special=-1, note="-1: the latest checkpoint"),
    "optim.lr": Bound(0, low_open=True),
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.b1": Bound(0, 1, high_open=True),
    "optim.b2": Bound(0, 1, high_open=True),
    "optim.eps": _NON_NEGATIVE,
    "optim.momentum": _NON_NEGATIVE,
    "optim.warmup_steps": _NON_NEGATIVE,
    "optim.warmup_init_lr": _NON_NEGATIVE,
    "optim.end_lr": _NON_NEGATIVE,
    "optim.restart_period": _COUNT,
    "optim.clip_grad_norm": Bound(0, note="0: no clipping"),
    "optim.grad_accum_steps": _COUNT,
    "train.num_steps": Bound(
        0, note="0: train nothing and evaluate the initial weights; with train.stages: their total"
    ),
    "train.log_every": _COUNT,
    "train.eval_every": _COUNT,
    "train.checkpoint_every": _COUNT,
    "train.keep_checkpoints": _COUNT,
    "train.refresh_batch_stats": Bound(0, note="0: off"),
    "train.max_nonfinite_in_row": _COUNT,
    "stages.*.num_steps": _COUNT,
    "mesh.data": _AXIS,
    "mesh.fsdp": _AXIS,
    "mesh.tensor": _AXIS,
    "data.batch_size": _COUNT,
    "data.eval_batch_size": _COUNT,
    "data.num_workers": Bound(0, note="0: load in the main process"),
    "data.prefetch": _NON_NEGATIVE,
    "data.image_size": _COUNT,
    "data.max_text_len": _COUNT,
    "data.min_text_words": _NON_NEGATIVE,
    "data.label_fraction": Bound(0, 1, low_open=True),
    "data.zero_shot_per_class": _COUNT,
    "data.synthcxr.num_studies": _COUNT,
    "data.synthcxr.image_size": _COUNT,
    "data.synthcxr.zero_shot_per_class": Bound(0, note="0: automatic"),
    "evals.*.max_examples": _COUNT,
    "evals.*.rerank_k": Bound(0, note="0: off"),
    "evals.*.steps": _COUNT,
    "evals.*.max_train_examples": _COUNT,
    "downstream.head_hidden": Bound(0, note="0: a linear head"),
    "downstream.decoder_width": _COUNT,
    "downstream.out_stride": _COUNT,
    "downstream.max_boxes": _COUNT,
    "downstream.top_k": _COUNT,
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
    # A step whose loss or gradient norm is not finite never updates the state. "stop": the
    # run exits naming the step and the last good checkpoint; "skip": the step is dropped,
    # counted (train/nonfinite_skipped), and the run stops after max_nonfinite_in_row.
    c.train.on_nonfinite = "stop"
    c.train.max_nonfinite_in_row = 10
    # A damaged or incomplete latest checkpoint (checksums, metadata): "fallback" moves it
    # aside (checkpoints/damaged/) and restores the previous complete step; "error" stops.
    c.train.on_bad_checkpoint = "fallback"

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


def _rule(table: dict, path: str):
    """The entry of `table` whose pattern matches the dotted `path` (`*`: any one key)."""
    parts = path.split(".")
    for pattern, rule in table.items():
        want = pattern.split(".")
        if len(want) == len(parts) and all(w in ("*", p) for w, p in zip(want, parts)):
            return rule
    return None


def check_choices(config: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Fails when an enumerated field (`CHOICES`) holds a value outside its choices; `prefix`
    is where `config` sits in the run config, for the message."""
    for path in leaf_paths(config):
        allowed = _rule(CHOICES, path)
        value = lookup(config, path)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"config.{prefix}{path}={value!r}; expected one of {allowed}")


def check_ranges(config: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Fails when a numeric field (`RANGES`) holds a value outside its bound (or no number)."""
    for path in leaf_paths(config):
        bound = _rule(RANGES, path)
        if bound is None:
            continue
        value = lookup(config, path)
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (is_number and bound.admits(value)):
            raise ConfigError(f"config.{prefix}{path}={value!r}; expected {bound}")


def _sections(config: ml_collections.ConfigDict, prefix: str = ""):
    """(prefix, config) of the run config, of each stage's `set` (the fields it changes) and,
    recursively, of each prerequisite run."""
    yield prefix, config
    for name, spec in config.get("stages", {}).items():
        if isinstance(spec, ml_collections.ConfigDict) and "set" in spec:
            yield f"{prefix}stages.{name}.set.", spec.set
    for name, run in config.get("prerequisites", {}).items():
        yield from _sections(run, f"{prefix}prerequisites.{name}.")


def validate(config: ml_collections.ConfigDict) -> None:
    """Every check of values that needs no devices, data or files: `CHOICES` and `RANGES`,
    over the run config, its stages' `set` and its prerequisite runs. Entry points call it
    before any work (distributed start-up, mesh, data, compilation).

    Raises:
      ConfigError: naming `config.<path>=<value>` and what the field expects.
    """
    for prefix, section in _sections(config):
        check_choices(section, prefix)
        check_ranges(section, prefix)


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
