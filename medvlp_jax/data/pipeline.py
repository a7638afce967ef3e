"""Grain pipelines: infinite shuffled training batches and padded evaluation batches.

Training: `source -> seed -> shuffle -> repeat -> example -> [process_index::process_count]
-> batch(drop_remainder)`: one global shuffle per epoch (same seed on every process), then
each process takes every process_count-th example, so the processes' streams are disjoint
and together cover every epoch. Augmentation is seeded by the example's position in the
global stream, so no two processes draw the same augmentation.

Evaluation: process p gets records p, p + P, ..., padded (with `valid` False) to the same
number of full batches on every process: every record appears exactly once.

Bad records (`data.on_bad_record`, see `transforms.Guard`): a record that fails in the
pipeline (an image that does not decode) stops it ('error') or ('skip') is replaced by the
next good record in training and left out (`valid` False) in evaluation; the batch field
`BAD_FIELD` carries its reason code. The training iterator counts and drops that field
(`DataIterator.bad_record_metrics`); evaluation batches keep it for the evaluator.

Both return a `DataIterator` whose state (get_state / set_state, saved by Orbax through
`grain.checkpoint.CheckpointSave`) records the process layout, the records and the bad-record
counts, and refuses to restore into a different layout.
"""

from __future__ import annotations

import collections
import hashlib
import math

import grain
import numpy as np

from medvlp_jax.data.bad_records import BAD_FIELD, REASONS, code_reason
from medvlp_jax.data.records import Record
from medvlp_jax.data.transforms import (
    Example,
    Features,
    Guard,
    GuardedMap,
    GuardedRandomMap,
    ImageSpec,
)


def records_fingerprint(records: list[Record]) -> str:
    """sha1 over the records' paths, texts and labels (identifies a record list)."""
    h = hashlib.sha1()
    for r in records:
        h.update(r.image_path.encode())
        h.update(b"\0")
        h.update(r.text.encode())
        h.update(b"\0")
        h.update(np.nan_to_num(r.labels, nan=9.0).tobytes())
    return h.hexdigest()


class RecordSource(grain.sources.RandomAccessDataSource):
    """Random access over records: element i = {'index', 'record'[, 'valid']}.

    Args:
      records: all records.
      indices: which records, in order (default all); `index` is the position in `records`.
      valid: per element, False for padding (eval); omitted when None.
    """

    def __init__(self, records: list[Record], indices=None, valid=None):
        self._records = tuple(records)
        self._indices = (
            np.arange(len(records)) if indices is None else np.asarray(indices, np.int64)
        )
        self._valid = None if valid is None else np.asarray(valid, bool)
        self._fingerprint = records_fingerprint(records)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict:
        index = int(self._indices[i])
        element = {"index": index, "record": self._records[index]}
        if self._valid is not None:
            element["valid"] = np.bool_(self._valid[i])
        return element

    def __repr__(self) -> str:
        digest = hashlib.sha1(self._indices.tobytes()).hexdigest()[:12]
        records = f"{len(self._records)}:{self._fingerprint[:12]}"
        return f"RecordSource(records={records}, elements={len(self)}:{digest})"


class DataIterator(grain.DatasetIterator):
    """A grain iterator whose state names the process layout and the records.

    It counts, per reason key, the rows whose record failed in the pipeline (BAD_FIELD > 0:
    replaced in training, left out in evaluation) in the batches it has handed out; the
    counts are part of its state, so they survive a resume. With `drop_bad_field` the field
    is removed from the batches.

    `set_state` raises ValueError when the state was saved with another process count,
    process index, batch size or record list: the per-process streams (and so the position
    in them) would not mean the same examples.
    """

    def __init__(self, inner: grain.DatasetIterator, *, drop_bad_field: bool, **layout):
        super().__init__(inner)
        self._layout = layout
        self._drop_bad_field = drop_bad_field
        self._bad: collections.Counter = collections.Counter()

    def __next__(self) -> dict:
        batch = next(self._parent)
        # Worker processes hand batches over in shared memory; copy them into ordinary arrays
        # so that no shared-memory block outlives the iterator.
        batch = {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}
        codes = batch.pop(BAD_FIELD) if self._drop_bad_field else batch[BAD_FIELD]
        self._bad.update(code_reason(c) for c in codes[codes > 0])
        return batch

    def bad_record_metrics(self, prefix: str = "data/train/", gather: bool = False) -> dict:
        """Rows replaced because their record failed in the pipeline, so far (all epochs):
        `{prefix}replaced` and `{prefix}replaced/<reason key>` (the keys with a count > 0).

        Args:
          prefix: metric name prefix.
          gather: sum over all processes (a collective: every process must call it at the
            same point); else this process's share of the stream only.
        """
        counts = np.array([self._bad[r] for r in REASONS], np.int64)
        if gather:
            from jax.experimental import multihost_utils

            counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, len(REASONS))
            counts = counts.sum(axis=0)
        out = {f"{prefix}replaced": int(counts.sum())}
        out.update({f"{prefix}replaced/{r}": int(c) for r, c in zip(REASONS, counts) if c})
        return out

    def get_state(self) -> dict:
        return {**self._layout, "pipeline": self._parent.get_state(), "bad": dict(self._bad)}

    def set_state(self, state: dict) -> None:
        for key, value in self._layout.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data iterator state was saved with {key}={state.get(key)!r}, but this run "
                    f"has {key}={value!r}; a grain iterator state only restores with the same "
                    "process count, process index, batch size and records (the data is sharded "
                    "per process). Restart the data iterator from scratch instead."
                )
        self._parent.set_state(state["pipeline"])
        # States saved before the counts were kept have no "bad" entry: counting restarts.
        self._bad = collections.Counter(state.get("bad", {}))


def _local_batch(batch_size: int, process_count: int, what: str) -> int:
    if batch_size % process_count:
        raise ValueError(
            f"data.{what}={batch_size} is not divisible by process_count={process_count}"
        )
    return batch_size // process_count


def _iterate(ds: grain.MapDataset, data_cfg) -> grain.DatasetIterator:
    """MapDataset of batches -> iterator with thread prefetch or worker processes."""
    workers, prefetch = data_cfg.num_workers, data_cfg.prefetch
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(prefetch, 1))
        mp = grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(prefetch, 1)
        )
        return iter(ds.to_iter_dataset(read).mp_prefetch(mp))
    read = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(read))


def _example(data_cfg, tokenizer, hooks, *, augment: bool, training: bool) -> Example:
    """The record -> fields function (training draws a sentence when data.train_text says)."""
    return Example(
        ImageSpec.from_config(data_cfg, augment=augment),
        Features(tokenizer, data_cfg.max_text_len, data_cfg.uncertain_policy, hooks),
        random_sentence=training and data_cfg.train_text == "random_sentence",
    )


def train_dataset(
    data_cfg, records, tokenizer, *, seed, process_index=0, process_count=1, hooks=()
):
    """The training `grain.MapDataset` of per-process batches (infinite). See module doc."""
    if not records:
        raise ValueError("train pipeline: no records")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    batch = _local_batch(data_cfg.batch_size, process_count, "batch_size")
    records = tuple(records)  # one object for the source and the guard: pickled once
    example = _example(data_cfg, tokenizer, hooks, augment=True, training=True)
    guard = Guard(example, records, data_cfg.on_bad_record)
    ds = grain.MapDataset.source(RecordSource(records)).seed(seed).shuffle().repeat()
    ds = ds.random_map(GuardedRandomMap(guard))
    ds = ds[process_index::process_count]
    return ds.batch(batch, drop_remainder=True)


def train_iterator(
    data_cfg, records, tokenizer, *, seed, process_index=0, process_count=1, hooks=()
):
    """Infinite, shuffled, per-process training batches (checkpointable iterator).

    Each batch is a dict of numpy arrays, B = data_cfg.batch_size // process_count:
    image float32 [B, H, W, C], input_ids int32 [B, T], attention_mask int32 [B, T],
    labels float32 [B, 14] (after data.uncertain_policy), label_mask float32 [B, 14],
    index int32 [B] (position in `records`), plus the hooks' fields. A record that fails
    here is replaced by the next good one (data.on_bad_record='skip'; counted by
    `DataIterator.bad_record_metrics`) or raises BadRecordError naming its path ('error').
    """
    ds = train_dataset(
        data_cfg,
        records,
        tokenizer,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        hooks=hooks,
    )
    layout = dict(
        process_index=process_index,
        process_count=process_count,
        batch_size=data_cfg.batch_size,
        records=records_fingerprint(records),
        seed=seed,
    )
    return DataIterator(_iterate(ds, data_cfg), drop_bad_field=True, **layout)


def eval_batches(
    data_cfg,
    records,
    tokenizer,
    *,
    batch_size,
    process_index=0,
    process_count=1,
    hooks=(),
    augment=False,
):
    """Full, padded evaluation batches of this process; every record once across processes.

    Args:
      batch_size: global batch size (per process: batch_size // process_count).
      augment: apply the training augmentation (seeded by data.shuffle_seed).

    Returns:
      A DataIterator over ceil(ceil(N / P) / B) batches (the same count on every process),
      dicts as in `train_iterator` plus valid bool [B] (False on padding, whose fields repeat
      a real record) and BAD_FIELD int32 [B]: the reason code (`bad_records.code_reason`) of
      a record that failed here (data.on_bad_record='skip'; its row is not valid and holds
      another record's fields), else 0.
    """
    if not records:
        raise ValueError("eval pipeline: no records")
    local = _local_batch(batch_size, process_count, "eval batch_size")
    mine = np.arange(process_index, len(records), process_count)
    num_batches = math.ceil(math.ceil(len(records) / process_count) / local)
    pad = num_batches * local - len(mine)
    filler = mine[0] if len(mine) else 0
    indices = np.concatenate([mine, np.full(pad, filler, np.int64)])
    valid = np.arange(len(indices)) < len(mine)
    records = tuple(records)
    example = _example(data_cfg, tokenizer, hooks, augment=augment, training=False)
    guard = Guard(example, records, data_cfg.on_bad_record)
    ds = grain.MapDataset.source(RecordSource(records, indices, valid))
    if augment:
        ds = ds.seed(data_cfg.shuffle_seed).random_map(GuardedRandomMap(guard))
    else:
        ds = ds.map(GuardedMap(guard))
    layout = dict(
        process_index=process_index,
        process_count=process_count,
        batch_size=batch_size,
        records=records_fingerprint(records),
    )
    return DataIterator(_iterate(ds.batch(local), data_cfg), drop_bad_field=False, **layout)
