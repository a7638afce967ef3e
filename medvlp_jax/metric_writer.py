"""Metrics out: `WORKDIR/metrics.jsonl` always, TensorBoard events when TensorFlow is there.

Only process 0 writes. Each JSON line is `{"step": N, "<flat/name>": value, ...}`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from absl import logging


class MetricWriter:
    """Appends scalar metrics to metrics.jsonl (and TensorBoard through clu if available)."""

    def __init__(self, workdir: Path):
        self._active = jax.process_index() == 0
        self._path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self._active:
            try:
                from clu import metric_writers  # imports TensorFlow: the optional `tb` extra

                self._tb = metric_writers.create_default_writer(str(workdir), asynchronous=False)
            except ImportError:
                logging.info("TensorBoard events off (install the `tb` extra to write them)")

    def write(self, step: int, metrics: dict) -> None:
        if not self._active or not metrics:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        with self._path.open("a") as f:
            f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        if self._tb is not None:
            self._tb.write_scalars(int(step), scalars)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
