"""Builds the evaluators `config.evals` names and runs them on a train state.

`config.evals.<name>` = `{type, enabled, pred, <the type's FIELDS>}`: `type` names a module of
`medvlp_jax.evaluation` (see its docstring for the protocol), `pred` maps the evaluator's roles
to the method's predict functions (`Method.predict_fns`; omitted = the type's `PRED`).
Everything is checked when the `Evaluator` is built, before any training.

Metric keys are `eval/<data.source>/<metric>` for an eval named after its type (`zero_shot`,
`retrieval`, `linear_probe`), else `eval/<data.source>/<name>/<metric>`, so that several evals
of one type never collide.

The `Evaluator` is also the evaluators' context: predictions are computed sharded (each
process feeds its own records, padded batches carry a `valid` mask and each row's `index`),
gathered to every host, de-padded and put back in row order, so no example is dropped or
counted twice. The metric functions themselves are pure and live in `medvlp_jax.evaluation`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import operator
import pkgutil
from collections.abc import Callable, Iterator
from types import ModuleType

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from medvlp_jax import evaluation
from medvlp_jax.config import ConfigError
from medvlp_jax.data import pipeline, sources, tokenize
from medvlp_jax.data.records import Record, missing_labels
from medvlp_jax.parallel import mesh as mesh_lib

Predict = Callable[[dict], jax.Array]  # a predict function bound to variables: batch -> [B, ...]

# Batch fields a pair batch takes from its image's record; every other field (tokens, hook
# fields, labels) comes from its text's record.
IMAGE_FIELDS = ("image",)


def known_types() -> list[str]:
    """The evaluator modules of `medvlp_jax.evaluation` (those with a `run`)."""
    names = (m.name for m in pkgutil.iter_modules(evaluation.__path__))
    return sorted(n for n in names if hasattr(_import(n), "run"))


def _import(type_name: str) -> ModuleType | None:
    full = f"{evaluation.__name__}.{type_name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name != full:
            raise
        return None


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """One entry of `config.evals`, checked: its module, resolved config and metric prefix."""

    name: str
    module: ModuleType
    cfg: ml_collections.ConfigDict  # config.evals.<name>, `pred` filled in
    prefix: str


def build_spec(name: str, cfg, predict_names, prefix: str) -> EvalSpec:
    """Checks `config.evals.<name>` against its type and the method's predict functions.

    Args:
      name: the eval's name; cfg: `config.evals.<name>`.
      predict_names: the method's predict function names (checked only if the eval is enabled).
      prefix: `eval/<data.source>`.
    Raises:
      ConfigError: naming the field (`config.evals.<name>.type/pred/...`) and the valid choices.
    """
    where = f"config.evals.{name}"
    raw = cfg.to_dict()
    type_name = raw.get("type", "")
    module = _import(type_name) if type_name.isidentifier() else None
    if module is None or not hasattr(module, "run"):
        raise ConfigError(f"{where}.type={type_name!r}; known evaluator types: {known_types()}")
    fields = set(raw) - {"type", "enabled", "pred"}
    unknown, missing = fields - set(module.FIELDS), set(module.FIELDS) - fields
    if unknown or missing:
        raise ConfigError(
            f"{where}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}; "
            f"type {type_name!r} has {list(module.FIELDS)} (+ type, enabled, pred)"
        )
    pred = dict(raw.get("pred", module.PRED))
    if set(pred) - set(module.PRED):
        raise ConfigError(
            f"{where}.pred has roles {sorted(set(pred) - set(module.PRED))}; "
            f"{type_name!r} has roles {list(module.PRED)}"
        )
    resolved = ml_collections.ConfigDict({"enabled": True, **raw, "pred": pred})
    if resolved.enabled:
        for role, fn in pred.items():
            if fn and fn not in predict_names:
                raise ConfigError(
                    f"{where}.pred.{role}={fn!r}; the method's predict functions: "
                    f"{sorted(predict_names)}"
                )
    if hasattr(module, "check"):
        try:
            module.check(resolved)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return EvalSpec(name, module, resolved, prefix if name == type_name else f"{prefix}/{name}")


class Evaluator:
    """The evaluators of `config.evals` for one method and dataset, and their context.

    Context for `evaluation.<type>.run(ctx, preds, cfg)`: `config`, `mesh`, `seed`,
    `records(split)`, `zero_shot_records()`, and the sharded prediction helpers
    `predict_records` / `predict_texts` / `predict_pairs`.
    """

    def __init__(self, config: ml_collections.ConfigDict, method, mesh, tokenizer):
        self.config = config
        self.method = method
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.seed = config.seed
        self.hooks = method.data_hooks(tokenizer)
        self._predict = {name: jax.jit(fn) for name, fn in method.predict_fns().items()}
        prefix = f"eval/{config.data.source}"
        self.specs = [
            build_spec(name, cfg, self._predict, prefix) for name, cfg in config.evals.items()
        ]
        self._records: dict[str, list[Record]] = {}
        self._zero_shot: tuple[list[Record], np.ndarray] | None = None

    def records(self, split: str) -> list[Record]:
        """The records of `split` (loaded once)."""
        if split not in self._records:
            self._records[split] = sources.load_records(self.config.data, split)
        return self._records[split]

    def zero_shot_records(self) -> tuple[list[Record], np.ndarray]:
        """`sources.load_zero_shot_records` (loaded once): records and int32 `[N]` labels
        indexing `sources.ZERO_SHOT_CLASSES`."""
        if self._zero_shot is None:
            self._zero_shot = sources.load_zero_shot_records(self.config.data)
        return self._zero_shot

    def _gather(self, x) -> np.ndarray:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def _collect(self, local_batches: Iterator[dict], fns: dict[str, Predict]) -> dict:
        """Runs `fns` on global batches made of each process's `local_batches` (numpy, with
        `index` `[b]` and `valid` `[b]`) -> `{key: [N, ...]}` numpy gathered to every process,
        in `index` order, padding dropped."""
        out: dict[str, list] = {"index": [], **{key: [] for key in fns}}
        for local in local_batches:
            batch = mesh_lib.global_batch(self.mesh, local)
            valid = self._gather(batch["valid"]).astype(bool)
            out["index"].append(self._gather(batch["index"])[valid])
            for key, fn in fns.items():
                out[key].append(self._gather(fn(batch))[valid])
        return _in_index_order(out)

    def _eval_batches(self, records: list[Record], process_index: int, process_count: int):
        return pipeline.eval_batches(
            self.config.data,
            records,
            self.tokenizer,
            batch_size=self.config.data.eval_batch_size,
            process_index=process_index,
            process_count=process_count,
            hooks=self.hooks,
        )

    def predict_records(self, records: list[Record], fns: dict[str, Predict]) -> dict:
        """Each of `fns` over `records` (each process feeds its share) -> numpy arrays in
        record order: `{key: [N, ...]}` for every key of `fns`, plus `labels` / `label_mask`
        `[N, 14]`."""
        labels = {key: operator.itemgetter(key) for key in ("labels", "label_mask")}
        batches = self._eval_batches(records, jax.process_index(), jax.process_count())
        return self._collect(batches, {**fns, **labels})

    def _host_fields(self, records: list[Record]) -> dict[str, np.ndarray]:
        """Every batch field of all `records`, on this host: `{key: [N, ...]}` in record order
        (each process loads every record; for the small sets pair scoring takes)."""
        out: dict[str, list] = {}
        for batch in self._eval_batches(records, 0, 1):
            for key, value in batch.items():
                if key != "valid":
                    out.setdefault(key, []).append(value[batch["valid"]])
        return _in_index_order(out)

    def _predict_rows(self, fn: Predict, num_rows: int, take: Callable[[np.ndarray], dict]):
        """`fn` over rows `0..num_rows-1` that every process can build alike (`take(rows)` ->
        their numpy batch fields) -> `[num_rows, ...]`, in eval batches split over processes."""
        size = self.config.data.eval_batch_size
        if size % jax.process_count():
            raise ValueError(f"data.eval_batch_size={size} does not split over the processes")
        local = size // jax.process_count()

        def batches():
            for start in range(0, num_rows, size):
                rows = start + jax.process_index() * local + np.arange(local)
                valid = rows < num_rows
                rows = np.where(valid, rows, 0)
                yield {**take(rows), "index": rows.astype(np.int32), "valid": valid}

        return self._collect(batches(), {"out": fn})["out"]

    def predict_texts(self, texts: list[str], fn: Predict) -> np.ndarray:
        """`fn` over free texts (class prompts) -> `[len(texts), ...]`, through the method's
        data hooks (e.g. MCPL's keywords of the prompt itself)."""
        ids, mask = tokenize.tokenize(self.tokenizer, texts, self.config.data.max_text_len)
        fields = {"input_ids": ids, "attention_mask": mask}
        fake = [Record(image_path="", text=t, labels=missing_labels()) for t in texts]
        for hook in self.hooks:
            per = [hook(r) for r in fake]
            fields.update({k: np.stack([p[k] for p in per]) for k in per[0]})
        return self._predict_rows(
            fn, len(texts), lambda rows: {k: v[rows] for k, v in fields.items()}
        )

    def predict_pairs(self, records: list[Record], pairs: np.ndarray, fn: Predict) -> np.ndarray:
        """A pair scorer over image-text pairs of `records`.

        Args:
          records: N records; every process loads all of them (N is an eval's max_examples).
          pairs: `[P, 2]` int (image record, text record): row r pairs the `IMAGE_FIELDS` of
            `records[pairs[r, 0]]` with every other field of `records[pairs[r, 1]]`.
          fn: `batch -> [B]` (e.g. `pair_score`).
        Returns:
          `[P]` numpy scores.
        """
        fields = self._host_fields(records)

        def take(r):
            image, text = pairs[r, 0], pairs[r, 1]
            return {k: v[image if k in IMAGE_FIELDS else text] for k, v in fields.items()}

        return self._predict_rows(fn, len(pairs), take)

    def embed_records(self, variables, records: list[Record], texts: bool = True) -> dict:
        """`embed_image` (and `embed_text` if `texts`) over `records` -> numpy arrays in record
        order: `image` `[N, D]`, `text` `[N, D]`, `labels`/`label_mask` `[N, 14]`."""
        roles = (
            {"image": "embed_image", "text": "embed_text"} if texts else {"image": "embed_image"}
        )
        return self.predict_records(records, self._bind(variables, roles))

    def embed_text_list(self, variables, texts: list[str]) -> np.ndarray:
        """`embed_text` over free texts -> `[len(texts), D]` (see `predict_texts`)."""
        return self.predict_texts(texts, self._bind(variables, {"text": "embed_text"})["text"])

    def _bind(self, variables, roles: dict[str, str]) -> dict[str, Predict]:
        """`{role: predict-function name}` -> `{role: batch -> array}` on `variables`."""
        return {role: functools.partial(self._predict[fn], variables) for role, fn in roles.items()}

    def run(self, state) -> dict:
        """All enabled evaluators -> `{'eval/<dataset>[/<name>]/<metric>': float}`."""
        variables = state.variables()
        metrics: dict = {}
        for spec in self.specs:
            if spec.cfg.enabled:
                preds = self._bind(variables, {r: fn for r, fn in spec.cfg.pred.items() if fn})
                for key, value in spec.module.run(self, preds, spec.cfg).items():
                    metrics[f"{spec.prefix}/{key}"] = float(value)
        return metrics


def _in_index_order(out: dict[str, list]) -> dict[str, np.ndarray]:
    """`{'index': [chunks of [n]], key: [chunks of [n, ...]]}` -> `{key: [N, ...]}` concatenated
    and sorted by index (the index itself dropped)."""
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    order = np.argsort(arrays.pop("index"), kind="stable")
    return {k: v[order] for k, v in arrays.items()}
