"""Runs the evaluators of `config.evals` on a train state; returns flat `eval/<dataset>/<name>`.

Embeddings are computed sharded (each process feeds its own records, padded batches carry a
`valid` mask and each record's `index`), gathered to every host, de-padded and put back in
record order, so no example is dropped or counted twice. The metric functions themselves are
pure and live in `medvlp_jax.evaluation`.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from medvlp_jax.data import pipeline, sources, tokenize
from medvlp_jax.data.records import FIVE_CLASSES, Record
from medvlp_jax.evaluation.linear_probe import linear_probe
from medvlp_jax.evaluation.retrieval import retrieval_metrics
from medvlp_jax.evaluation.zero_shot import zero_shot_classify
from medvlp_jax.parallel import mesh as mesh_lib


class Evaluator:
    """Zero-shot classification, retrieval and linear probe for one method and dataset."""

    def __init__(self, config: ml_collections.ConfigDict, method, mesh, tokenizer):
        self.config = config
        self.method = method
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.hooks = method.data_hooks(tokenizer)
        self.prefix = f"eval/{config.data.source}"
        self._embed_images = jax.jit(method.embed_images)
        self._embed_texts = jax.jit(method.embed_texts)
        self._records: dict[str, list[Record]] = {}

    def _split(self, split: str) -> list[Record]:
        if split not in self._records:
            self._records[split] = sources.load_records(self.config.data, split)
        return self._records[split]

    def _gather(self, x) -> np.ndarray:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def embed_records(self, variables, records: list[Record], texts: bool = True) -> dict:
        """Embeds `records` -> dict of numpy arrays in record order: `image` `[N, D]`,
        `text` `[N, D]` (if `texts`), `labels`/`label_mask` `[N, 14]`."""
        out: dict[str, list] = {"index": [], "image": [], "labels": [], "label_mask": []}
        if texts:
            out["text"] = []
        for batch in pipeline.eval_batches(
            self.config.data,
            records,
            self.tokenizer,
            batch_size=self.config.data.eval_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            hooks=self.hooks,
        ):
            batch = mesh_lib.global_batch(self.mesh, batch)
            valid = self._gather(batch["valid"]).astype(bool)
            out["index"].append(self._gather(batch["index"])[valid])
            out["image"].append(self._gather(self._embed_images(variables, batch))[valid])
            if texts:
                out["text"].append(self._gather(self._embed_texts(variables, batch))[valid])
            for key in ("labels", "label_mask"):
                out[key].append(self._gather(batch[key])[valid])
        arrays = {k: np.concatenate(v) for k, v in out.items()}
        order = np.argsort(arrays.pop("index"), kind="stable")
        return {k: v[order] for k, v in arrays.items()}

    def embed_text_list(self, variables, texts: list[str]) -> np.ndarray:
        """Embeds free texts (class prompts) -> `[len(texts), D]` through the method's text path,
        hooks included (e.g. MCPL's keywords of the prompt itself)."""
        shards = mesh_lib.batch_shards(self.mesh)
        padded = texts + [texts[-1]] * (-len(texts) % shards)
        ids, mask = tokenize.tokenize(self.tokenizer, padded, self.config.data.max_text_len)
        batch = {"input_ids": ids, "attention_mask": mask}
        fake = [
            Record(
                image_path="",
                text=t,
                labels=np.full(14, np.nan, np.float32),
                study_id="",
                subject_id="",
                view="",
            )
            for t in padded
        ]
        for hook in self.hooks:
            fields = [hook(r) for r in fake]
            batch.update({k: np.stack([f[k] for f in fields]) for k in fields[0]})
        # Every process embeds the same texts; the global batch is this list, unsharded.
        local = {k: v[jax.process_index() :: jax.process_count()] for k, v in batch.items()}
        emb = self._embed_texts(variables, mesh_lib.global_batch(self.mesh, local))
        gathered = self._gather(emb)
        order = np.concatenate(
            [np.arange(len(padded))[i :: jax.process_count()] for i in range(jax.process_count())]
        )
        result = np.empty_like(gathered)
        result[order] = gathered
        return result[: len(texts)]

    def zero_shot(self, variables) -> dict:
        records, labels = sources.load_zero_shot_records(self.config.data)
        images = self.embed_records(variables, records, texts=False)["image"]
        templates = self.config.evals.zero_shot.templates
        prompts = [t.format(c.lower()) for c in FIVE_CLASSES for t in templates]
        class_emb = self.embed_text_list(variables, prompts)
        class_emb = class_emb.reshape(len(FIVE_CLASSES), len(templates), -1)
        result = zero_shot_classify(images, class_emb, labels)
        return {"zero_shot_acc": result["acc"], "zero_shot_macro_f1": result["macro_f1"]}

    def retrieval(self, variables) -> dict:
        records = self._split("test")[: self.config.evals.retrieval.max_examples]
        emb = self.embed_records(variables, records)
        texts = [r.text for r in records]
        # Identical reports are equally correct answers (templated normal studies repeat).
        first = {t: i for i, t in reversed(list(enumerate(texts)))}
        groups = np.array([first[t] for t in texts])
        gt = groups[:, None] == groups[None, :]
        return retrieval_metrics(emb["image"], emb["text"], gt)

    def linear_probe(self, variables) -> dict:
        cfg = self.config.evals.linear_probe
        train = self.embed_records(variables, self._split("train")[: cfg.max_train_examples], False)
        val = self.embed_records(variables, self._split("validate"), texts=False)
        test = self.embed_records(variables, self._split("test"), texts=False)
        results = linear_probe(
            train["image"],
            train["labels"],
            train["label_mask"],
            test["image"],
            test["labels"],
            test["label_mask"],
            fractions=tuple(cfg.fractions),
            seed=self.config.seed,
            steps=cfg.steps,
            l2=tuple(cfg.l2_grid),
            val=(val["image"], val["labels"], val["label_mask"]),
        )
        return {
            f"linear_probe_auroc@{fraction:g}": result["auroc"]
            for fraction, result in results.items()
        }

    def run(self, state) -> dict:
        """All enabled evaluators -> `{'eval/<dataset>/<metric>': float}`."""
        variables = state.variables()
        metrics: dict = {}
        evals = self.config.evals
        if evals.zero_shot.enabled:
            metrics.update(self.zero_shot(variables))
        if evals.retrieval.enabled:
            metrics.update(self.retrieval(variables))
        if evals.linear_probe.enabled:
            metrics.update(self.linear_probe(variables))
        return {f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}
