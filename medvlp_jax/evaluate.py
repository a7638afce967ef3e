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

A record that fails in the eval pipeline (an image that does not decode; with
`data.on_bad_record='skip'`) is left out: the evaluator that met it is rerun without it, and
`records` / `zero_shot_records` no longer return it, so one bad image never stops an evaluation
and every metric is computed over the same, aligned rows. `Evaluator.left_out` names them;
`run` adds `eval/<data.source>/left_out[/<reason>]` counts when there are any.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import logging
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
from medvlp_jax.data.bad_records import BAD_FIELD, BadRecordError, code_reason
from medvlp_jax.data.records import Record, missing_labels
from medvlp_jax.nonfinite import NonFiniteError
from medvlp_jax.parallel import mesh as mesh_lib

Predict = Callable[[dict], jax.Array]  # a predict function bound to variables: batch -> [B, ...]

# Batch fields a pair batch takes from its image's record; every other field (tokens, hook
# fields, labels) comes from its text's record.
IMAGE_FIELDS = ("image",)

log = logging.getLogger(__name__)


class _LeftOut(Exception):
    """Records of a prediction pass that failed in the eval pipeline: `failed` {path: reason
    key}. Raised on every process alike (the reasons are gathered), caught by `Evaluator.run`."""

    def __init__(self, failed: dict[str, str]):
        super().__init__(f"{len(failed)} record(s) failed in the eval pipeline")
        self.failed = failed


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
        # Image path -> reason key of each record left out after failing in the pipeline.
        self.left_out: dict[str, str] = {}

    def records(self, split: str) -> list[Record]:
        """The records of `split` (loaded once), without those left out."""
        if split not in self._records:
            self._records[split] = sources.load_records(self.config.data, split)
        return [r for r in self._records[split] if r.image_path not in self.left_out]

    def zero_shot_records(self) -> tuple[list[Record], np.ndarray]:
        """`sources.load_zero_shot_records` (loaded once), without the records left out:
        records and int32 `[N]` labels indexing `sources.ZERO_SHOT_CLASSES`."""
        if self._zero_shot is None:
            self._zero_shot = sources.load_zero_shot_records(self.config.data)
        records, labels = self._zero_shot
        keep = [i for i, r in enumerate(records) if r.image_path not in self.left_out]
        return [records[i] for i in keep], labels[keep]

    def _gather(self, x) -> np.ndarray:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def _collect(self, local_batches: Iterator[dict], fns: dict[str, Predict], records=()) -> dict:
        """Runs `fns` on global batches made of each process's `local_batches` (numpy, with
        `index` `[b]` and `valid` `[b]`) -> `{key: [N, ...]}` numpy gathered to every process,
        in `index` order, padding dropped.

        Raises:
          _LeftOut: some rows' BAD_FIELD (eval pipeline batches of `records`) is set.
        """
        out: dict[str, list] = {"index": [], **{key: [] for key in fns}}
        failed: dict[str, str] = {}
        for local in local_batches:
            batch = mesh_lib.global_batch(self.mesh, local)
            valid = self._gather(batch["valid"]).astype(bool)
            index = self._gather(batch["index"])
            if BAD_FIELD in batch:
                codes = self._gather(batch[BAD_FIELD])
                failed.update(_failed(records, index, codes))
            out["index"].append(index[valid])
            for key, fn in fns.items():
                out[key].append(self._gather(fn(batch))[valid])
        if failed:
            raise _LeftOut(failed)
        return _check_finite(_in_index_order(out), fns)

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
        return self._collect(batches, {**fns, **labels}, records)

    def _host_fields(self, records: list[Record]) -> dict[str, np.ndarray]:
        """Every batch field of all `records`, on this host: `{key: [N, ...]}` in record order
        (each process loads every record; for the small sets pair scoring takes)."""
        out: dict[str, list] = {}
        failed: dict[str, str] = {}
        for batch in self._eval_batches(records, 0, 1):
            failed.update(_failed(records, batch["index"], batch.pop(BAD_FIELD)))
            for key, value in batch.items():
                if key != "valid":
                    out.setdefault(key, []).append(value[batch["valid"]])
        if failed:
            raise _LeftOut(failed)
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
        """All enabled evaluators -> `{'eval/<dataset>[/<name>]/<metric>': float}`, plus
        `eval/<dataset>/left_out[/<reason>]` when records were left out (see module doc)."""
        variables = state.variables()
        metrics: dict = {}
        for spec in self.specs:
            if spec.cfg.enabled:
                preds = self._bind(variables, {r: fn for r, fn in spec.cfg.pred.items() if fn})
                for key, value in self._run_one(spec, preds).items():
                    metrics[f"{spec.prefix}/{key}"] = float(value)
        return metrics | self._left_out_metrics()

    def _run_one(self, spec: EvalSpec, preds: dict[str, Predict]) -> dict:
        """`spec`'s evaluator; rerun without the records that failed in its pipeline."""
        while True:
            try:
                return spec.module.run(self, preds, spec.cfg)
            except _LeftOut as e:
                new = {path: why for path, why in e.failed.items() if path not in self.left_out}
                if not new:  # records not from `records` / `zero_shot_records`
                    path, why = next(iter(e.failed.items()))
                    raise BadRecordError(
                        path, f"{why}: failed in config.evals.{spec.name}'s eval pipeline again"
                    ) from None
                self.left_out.update(new)
                log.warning(
                    "config.evals.%s: left out %d record(s) that failed in the eval pipeline "
                    "(%s); rerunning it without them",
                    spec.name,
                    len(new),
                    ", ".join(f"{path} ({why})" for path, why in sorted(new.items())),
                )

    def _left_out_metrics(self) -> dict[str, float]:
        if not self.left_out:
            return {}
        prefix = f"eval/{self.config.data.source}/left_out"
        counts = collections.Counter(self.left_out.values())
        return {prefix: float(len(self.left_out))} | {
            f"{prefix}/{why}": float(n) for why, n in sorted(counts.items())
        }


def _failed(records, index: np.ndarray, codes: np.ndarray) -> dict[str, str]:
    """{image path: reason key} of the rows of one batch whose BAD_FIELD `codes` is set."""
    return {records[i].image_path: code_reason(c) for i, c in zip(index, codes) if c}


def _in_index_order(out: dict[str, list]) -> dict[str, np.ndarray]:
    """`{'index': [chunks of [n]], key: [chunks of [n, ...]]}` -> `{key: [N, ...]}` concatenated
    and sorted by index (the index itself dropped)."""
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    order = np.argsort(arrays.pop("index"), kind="stable")
    return {k: v[order] for k, v in arrays.items()}


def _check_finite(out: dict[str, np.ndarray], fns: dict) -> dict[str, np.ndarray]:
    """`out`, after failing on non-finite float predictions (the labels are not checked): a
    NaN similarity would rank arbitrarily and score as if perfect."""
    for key in fns:
        value = out[key]
        if key in ("labels", "label_mask") or not np.issubdtype(value.dtype, np.floating):
            continue
        bad = ~np.isfinite(value)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            raise NonFiniteError(
                f"evaluation: the '{key}' predictions hold {int(bad.sum())} non-finite values "
                f"(rows {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''} of {len(value)}); "
                "the weights or the compute dtype overflow. No metric is computed from them"
            )
    return out
