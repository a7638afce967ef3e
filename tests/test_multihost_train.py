"""Multi-host training on one machine: `python -m medvlp_jax.main` as 2 processes x 4 CPU
devices against 1 process x 8 devices, a preemption notice (SIGTERM) to one of the two
processes, the 2-process checkpoint resumed by 1 process, and `kill -9` of one process.

The two processes are started with launch/local.py's command line and environment, but by
this test, so that it can signal one of them. The reference and the resume run in this
(8-device) test process. The global batch is the same set of examples in both layouts (each
process takes every 2nd example of one shuffled stream) in another row order, so the
permutation-invariant contrastive losses and the evaluation metrics agree to float tolerance.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from medvlp_jax import checkpointing, train
from medvlp_jax import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_local", ROOT / "launch" / "local.py")
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)

SIGNAL_AFTER = 3  # SIGTERM to process 1 once step 3 is logged; both stop at one later step
OVERRIDES = (
    "train.log_every=1",
    "train.eval_every=2",
    "train.checkpoint_every=1000",
    "optim.schedule=constant",  # lr must not depend on num_steps (unknown until the signal)
    "model.image.num_layers=1",
    "model.text.num_layers=1",
    "model.text.dropout_rate=0.0",
    "model.text.attention_dropout_rate=0.0",
    "evals.linear_probe.enabled=false",
    "evals.retrieval.max_examples=40",  # not a multiple of the eval batch: padding is dropped
)


def _config(*extra: str):
    config = config_lib.load_config_file(str(ROOT / "configs/clip.py:tiny"))
    return config_lib.apply_overrides(config, [*OVERRIDES, *extra])


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _by_step(rows: list[dict], prefix: str) -> dict[int, dict]:
    """{step: {name: value}} of the metrics named `prefix...`; fails on a name written twice."""
    out: dict[int, dict] = {}
    for row in rows:
        for name, value in row.items():
            if name.startswith(prefix):
                assert name not in out.setdefault(row["step"], {}), (row["step"], name)
                out[row["step"]][name] = value
    return out


def _start_two_processes(workdir: Path, outputs: list, *extra: str) -> list[subprocess.Popen]:
    """Processes 0 and 1 of the job, as launch/local.py would start them; `extra` overrides."""
    args, passthrough = local.parse_args(
        [
            "--num_processes=2",
            "--devices_per_process=4",
            "--config=configs/clip.py:tiny",
            f"--workdir={workdir}",
            "--config.train.num_steps=1000",
            *[f"--config.{o}" for o in (*OVERRIDES, *extra)],
        ]
    )
    env = local.child_env(args, dict(os.environ))
    port = local.free_port()
    return [
        subprocess.Popen(
            local.child_command(args, passthrough, port, i),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        for i, out in enumerate(outputs)
    ]


@contextlib.contextmanager
def _two_processes(workdir: Path, log_dir: Path, *extra: str):
    """Runs processes 0 and 1 (logs in `log_dir/process_I.log`); kills what is left on exit."""
    outputs = [open(log_dir / f"process_{i}.log", "w") for i in range(2)]  # noqa: SIM115
    procs = _start_two_processes(workdir, outputs, *extra)
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out in outputs:
            out.close()


def _wait_for_step(workdir: Path, step: int, procs, logs: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while step not in _by_step(_metrics(workdir), "train/"):
        failed = [p.returncode for p in procs if p.poll() is not None]
        if failed or time.monotonic() > deadline:
            tails = [(logs / f"process_{i}.log").read_text()[-3000:] for i in range(2)]
            pytest.fail(f"no step {step} (exit codes {failed}):\n" + "\n".join(tails))
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The 2 x 4 job (SIGTERM to process 1 after step 3) and, for as many steps as it made,
    the 1 x 8 reference."""
    base = tmp_path_factory.mktemp("multihost")
    multi, single = base / "multi", base / "single"
    multi.mkdir()
    single.mkdir()
    with _two_processes(multi, base) as procs:
        _wait_for_step(multi, SIGNAL_AFTER, procs, base, timeout_s=400)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=180) for p in procs]
    logs = [(base / f"process_{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    saved = sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] > SIGNAL_AFTER, saved
    steps = saved[0]
    train.run(_config(f"train.num_steps={steps}"), single)
    return {"multi": multi, "single": single, "steps": steps, "logs": logs}


def test_two_processes_give_the_losses_of_one(runs):
    single = _by_step(_metrics(runs["single"]), "train/")
    multi = _by_step(_metrics(runs["multi"]), "train/")
    assert sorted(multi) == sorted(single) == list(range(1, runs["steps"] + 1))
    for step in single:
        for name in ("train/loss", "train/loss_i2t", "train/loss_t2i", "train/lr"):
            assert multi[step][name] == pytest.approx(single[step][name], abs=1e-5), (step, name)
    losses = [single[s]["train/loss"] for s in single]
    assert len(set(losses)) == len(losses)  # every step trained on another batch


def test_two_processes_evaluate_every_record_once(runs):
    """Zero-shot and retrieval gather embeddings from both processes (padding dropped, record
    order restored); a lost, doubled or misplaced row changes these metrics."""
    single = _by_step(_metrics(runs["single"]), "eval/")[2]
    multi = _by_step(_metrics(runs["multi"]), "eval/")[2]
    assert sorted(multi) == sorted(single)
    assert any("zero_shot" in k for k in single) and any("_R@" in k for k in single)
    for name, value in single.items():
        assert multi[name] == pytest.approx(value, abs=1e-5), name


def test_sigterm_to_one_process_stops_both_after_the_same_step(runs):
    """JAX's preemption sync point: both processes save step N and exit 0."""
    steps = runs["steps"]
    for log in runs["logs"]:
        assert f"preemption notice: saving a checkpoint at step {steps}, then stopping" in log
    rows = _by_step(_metrics(runs["multi"]), "train/")
    assert max(rows) == steps


def test_two_process_checkpoint_holds_the_same_state(runs):
    """Orbax wrote one state from both processes' shards, equal to the 1-process state, and
    one data-iterator file per process; one process reads it back as host arrays."""
    steps = runs["steps"]
    single, multi = (
        checkpointing.read_variables(checkpointing.find_state_dir(str(runs[k]), k))["params"]
        for k in ("single", "multi")
    )
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(single)[0], jax.tree.leaves(multi), strict=True
    ):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    data = runs["multi"] / "checkpoints" / str(steps) / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def test_only_process_zero_writes_and_logs_name_the_process(runs):
    rows = _metrics(runs["multi"])
    steps = [row["step"] for row in rows if "train/loss" in row]
    assert steps == list(range(1, runs["steps"] + 1))  # once each: process 1 wrote nothing
    for pid, log in enumerate(runs["logs"]):
        # The preemption warning, prefixed with the process that logged it.
        assert f"[process {pid}/2] W" in log and f"[process {1 - pid}/2]" not in log


def test_one_process_resumes_a_two_process_checkpoint(runs, tmp_path, caplog):
    """The train state restores on the other layout; the data iterator restarts, with a
    warning that names the reason."""
    steps = runs["steps"]
    workdir = tmp_path / "resumed"
    shutil.copytree(runs["multi"], workdir)
    more = steps + 2
    with caplog.at_level(logging.WARNING):
        train.run(
            _config(
                f"train.num_steps={more}",
                "evals.zero_shot.enabled=false",
                "evals.retrieval.enabled=false",
            ),
            workdir,
        )
    assert (
        f"data iterator state not restored: the checkpoint at step {steps} holds "
        "['process_0-of-2.json', 'process_1-of-2.json'], this run has 1 process(es); "
        "continuing with a fresh iterator"
    ) in caplog.text
    rows = _by_step(_metrics(workdir), "train/")
    assert sorted(rows) == list(range(1, more + 1))  # went on at steps + 1, repeated no step
    assert all(np.isfinite(rows[s]["train/loss"]) for s in (steps + 1, more))


def test_kill_9_of_one_process_stops_the_other_with_a_clear_error(tmp_path):
    """A SIGKILLed process cannot say goodbye: JAX's coordination service notices its missing
    heartbeats and the survivor, blocked in the next collective, aborts naming the reason."""
    heartbeat_s = 10
    run = tmp_path / "run"
    with _two_processes(run, tmp_path, f"distributed.heartbeat_timeout_s={heartbeat_s}") as procs:
        _wait_for_step(run, 1, procs, tmp_path, timeout_s=400)
        procs[1].kill()
        killed_at = time.monotonic()
        code = procs[0].wait(timeout=heartbeat_s + 60)
        elapsed = time.monotonic() - killed_at
    log = (tmp_path / "process_0.log").read_text()
    assert code != 0, log[-3000:]
    assert "unhealthy" in log and "heartbeat" in log, log[-3000:]
    assert elapsed < heartbeat_s + 30, f"process 0 stopped {elapsed:.1f} s after the kill"
