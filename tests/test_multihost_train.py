"""Multi-host training on one machine: `python -m medvlp_jax.main` as 2 processes x 4 CPU
devices (launch/local.py) against 1 process x 8 devices, then the 2-process checkpoint resumed
by 1 process.

The reference run and the resume run in this (8-device) test process; only the 2-process job
pays for interpreter start-up. The global batch is the same set of examples in both layouts
(each process takes every 2nd example of one shuffled stream) in another row order, so the
permutation-invariant contrastive losses and the evaluation metrics agree to float tolerance.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from medvlp_jax import config as config_lib
from medvlp_jax import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
OVERRIDES = (
    f"train.num_steps={STEPS}",
    "train.log_every=1",
    f"train.checkpoint_every={STEPS}",
    f"train.eval_every={STEPS}",
    "model.text.dropout_rate=0.0",
    "model.text.attention_dropout_rate=0.0",
    "evals.linear_probe.enabled=false",
    "evals.retrieval.max_examples=40",  # not a multiple of the eval batch: padding is dropped
)


def _config(*extra: str):
    config = config_lib.load_config_file(str(ROOT / "configs/clip.py:tiny"))
    return config_lib.apply_overrides(config, [*OVERRIDES, *extra])


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _by_step(rows: list[dict], prefix: str) -> dict[int, dict]:
    """{step: {name: value}} for the metrics starting with `prefix`; fails on a repeated name."""
    out: dict[int, dict] = {}
    for row in rows:
        for name, value in row.items():
            if name.startswith(prefix):
                assert name not in out.setdefault(row["step"], {}), (row["step"], name)
                out[row["step"]][name] = value
    return out


def _params(workdir: Path, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The 1 x 8 reference (in this process, which also generates the data) and the 2 x 4 job."""
    base = tmp_path_factory.mktemp("multihost")
    single, multi = base / "single", base / "multi"
    single.mkdir()
    train.run(_config(), single)
    proc = subprocess.run(
        [
            sys.executable,
            "launch/local.py",
            "--num_processes=2",
            "--devices_per_process=4",
            "--timeout_s=500",
            "--",
            "--config=configs/clip.py:tiny",
            f"--workdir={multi}",
            *[f"--config.{o}" for o in OVERRIDES],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=560,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    return {"single": single, "multi": multi, "stdout": proc.stdout, "stderr": proc.stderr}


def test_two_processes_give_the_losses_of_one(runs):
    single = _by_step(_metrics(runs["single"]), "train/")
    multi = _by_step(_metrics(runs["multi"]), "train/")
    assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
    for step in single:
        for name in ("train/loss", "train/loss_i2t", "train/loss_t2i", "train/lr"):
            assert multi[step][name] == pytest.approx(single[step][name], abs=1e-5), (step, name)
    losses = [single[s]["train/loss"] for s in single]
    assert len(set(losses)) == STEPS  # the steps trained on different batches


def test_two_processes_evaluate_every_record_once(runs):
    """Zero-shot and retrieval gather embeddings from both processes (padding dropped, record
    order restored); any lost, doubled or misplaced row changes these metrics."""
    single = _by_step(_metrics(runs["single"]), "eval/")[STEPS]
    multi = _by_step(_metrics(runs["multi"]), "eval/")[STEPS]
    assert sorted(multi) == sorted(single)
    assert any("zero_shot" in k for k in single) and any("_R@" in k for k in single)
    for name, value in single.items():
        assert multi[name] == pytest.approx(value, abs=1e-5), name


def test_two_process_checkpoint_holds_the_same_state(runs):
    """Orbax wrote one state from both processes' shards, equal to the 1-process state, and
    one data-iterator file per process."""
    single, multi = _params(runs["single"], STEPS), _params(runs["multi"], STEPS)
    assert int(multi["step"]) == STEPS
    flat_single = dict(_flatten(single["params"]))
    flat_multi = dict(_flatten(multi["params"]))
    assert flat_multi.keys() == flat_single.keys()
    for name, value in flat_single.items():
        np.testing.assert_allclose(flat_multi[name], value, rtol=0, atol=1e-5, err_msg=name)
    data = runs["multi"] / "checkpoints" / str(STEPS) / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def _flatten(tree, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", np.asarray(value)


def test_only_process_zero_writes_and_logs_name_the_process(runs):
    rows = _metrics(runs["multi"])
    steps = [row["step"] for row in rows if "train/loss" in row]
    assert steps == list(range(1, STEPS + 1))  # once each: process 1 wrote nothing
    out = runs["stdout"]
    for pid in (0, 1):
        assert re.search(rf"^\[p{pid}\] \[process {pid}/2\] I.*train\.py", out, re.M), out[-3000:]
    assert "all 2 processes finished" in runs["stderr"]


def test_one_process_resumes_a_two_process_checkpoint(runs, tmp_path, caplog):
    """The train state restores on the other layout; the data iterator restarts, with a
    warning that names the reason."""
    workdir = tmp_path / "resumed"
    shutil.copytree(runs["multi"], workdir)
    more = STEPS + 2
    with caplog.at_level(logging.WARNING):
        train.run(
            _config(
                f"train.num_steps={more}",
                "evals.zero_shot.enabled=false",
                "evals.retrieval.enabled=false",
            ),
            workdir,
        )
    warning = (
        f"data iterator state not restored: the checkpoint at step {STEPS} holds "
        "['process_0-of-2.json', 'process_1-of-2.json'], this run has 1 process(es); "
        "continuing with a fresh iterator"
    )
    assert warning in caplog.text
    rows = _by_step(_metrics(workdir), "train/")
    assert sorted(rows) == list(range(1, more + 1))  # resumed at STEPS + 1, no step repeated
    # lr(step) is computed from the restored step: warm-up to 1e-4 over 2 steps, then cosine
    # over the remaining `more - 2` steps; step STEPS + 1 uses lr(STEPS).
    expected_lr = 1e-4 * 0.5 * (1 + np.cos(np.pi * (STEPS - 2) / (more - 2)))
    assert rows[STEPS + 1]["train/lr"] == pytest.approx(expected_lr, rel=1e-5)
    assert all(np.isfinite(rows[s]["train/loss"]) for s in (STEPS + 1, more))
