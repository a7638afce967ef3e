"""What a person sees: the main command's console (summary, step lines with ETA, an
evaluation table, no library INFO lines, well under 100 lines), the throughput keys of
metrics.jsonl, `train.profile`'s trace, and `mode=eval` on a finished workdir."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medvlp_jax import throughput

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
# Retrieval alone keeps the evaluation cheap; zero-shot and the probe run in other tests.
EVALS = ("evals.zero_shot.enabled=false", "evals.linear_probe.enabled=false")
# absl's INFO line prefix, e.g. "I1201 09:41:02.123456 ..."
ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


def _main(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "medvlp_jax.main",
        "--config=configs/clip.py:tiny",
        f"--workdir={workdir}",
        *(f"--config.{o}" for o in (*EVALS, *overrides)),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("console") / "run"
    trained = _main(
        workdir,
        f"train.num_steps={STEPS}",
        "train.log_every=2",
        f"train.eval_every={STEPS}",
        "train.profile=true",
    )
    evaluated = _main(workdir, f"train.num_steps={STEPS}", "mode=eval")
    return SimpleNamespace(workdir=workdir, trained=trained, evaluated=evaluated)


def test_console_is_short_and_says_what_happens(run):
    lines = run.trained.stdout.splitlines()
    assert len(lines) < 100, run.trained.stdout
    text = run.trained.stdout
    assert lines[0].startswith("medvlp_jax: method clip, 8 cpu device(s)")
    assert "training records, batch 16" in text and f"steps: {STEPS} (main {STEPS})" in text
    assert re.search(r"parameters [\d.]+[kMB]? \(trainable [\d.]+[kMB]?, frozen 0\)", text)
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == [f"{s}/{STEPS}" for s in (2, 4, 6, 8)]
    assert all(re.search(r"loss \d+\.\d{4}  lr \S+  [\d.]+ ex/s  ETA \d+s$", s) for s in steps)
    table = text.split(f"evaluation at step {STEPS}:\n")[1].splitlines()
    assert table[0].split()[0] == "i2t_P@1" and float(table[0].split()[1]) >= 0.0
    recall = next(row.split() for row in table if row.split()[0] == "i2t_R@1")
    assert 0.0 <= float(recall[1]) <= 1.0
    # Library INFO chatter stays out of both streams.
    assert not ABSL_INFO.search(text) and not ABSL_INFO.search(run.trained.stderr)
    assert "orbax" not in run.trained.stderr.lower()


def test_parameter_table_goes_to_the_workdir(run):
    table = (run.workdir / "parameters.txt").read_text()
    assert "image/cls" in table and "text_proj/kernel" in table
    assert re.search(r"trainable [\d,]+ of [\d,]+ parameters \(100\.0%\); frozen 0", table)


def test_throughput_keys_in_metrics(run):
    rows = [json.loads(line) for line in (run.workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    for r in train_rows:
        assert r["train/examples_per_s_per_device"] * 8 == pytest.approx(r["train/examples_per_s"])
        assert r["train/tflops_per_device"] > 0
        assert "train/mfu" not in r  # no known peak for a CPU


def test_profile_trace_is_written(run):
    traces = list((run.workdir / "profile").rglob("*.xplane.pb"))
    assert traces, sorted(p.name for p in (run.workdir / "profile").rglob("*"))
    assert "profile of steps 2-4 written to" in run.trained.stdout


def test_mode_eval_evaluates_the_checkpoint_and_trains_nothing(run):
    out = run.evaluated.stdout
    assert f"evaluating the checkpoint at step {STEPS} (stage 'main')" in out
    assert f"evaluation at step {STEPS}:" in out and "step 1/" not in out
    written = json.loads((run.workdir / f"eval_{STEPS}.json").read_text())
    logged = [json.loads(line) for line in (run.workdir / "metrics.jsonl").read_text().splitlines()]
    # The same checkpoint evaluated twice (after training, then by mode=eval): same figures.
    during, after = (r for r in logged if "eval/synthcxr/i2t_R@1" in r)
    assert during == after == {"step": STEPS, **written}
    steps = sorted(int(p.name) for p in (run.workdir / "checkpoints").iterdir())
    assert steps[-1] == STEPS


def test_mode_eval_names_the_missing_step(run, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "medvlp_jax.main",
        "--config=configs/clip.py:tiny",
        f"--workdir={run.workdir}",
        "--config.mode=eval",
        "--config.eval_step=3",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "no checkpoint at step 3" in out.stderr and f"[{STEPS}]" in out.stderr


def test_mfu_from_flops_time_and_the_peak_table():
    gpu = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    meter = throughput.Throughput(flops_per_step=2e12, devices=[gpu] * 4)
    m = meter.metrics(global_batch=64, seconds_per_step=0.5)
    assert m["train/examples_per_s"] == 128 and m["train/examples_per_s_per_device"] == 32
    assert m["train/tflops_per_device"] == pytest.approx(4.0)
    assert m["train/mfu"] == pytest.approx(4.0 / 989.0)
    assert throughput.peak_tflops("TPU v5 lite") == 197.0
    assert throughput.peak_tflops("TPU v5p") == 459.0
    assert throughput.peak_tflops("cpu") is None
    cpu = throughput.Throughput(flops_per_step=None, devices=[SimpleNamespace(device_kind="cpu")])
    assert set(cpu.metrics(8, 1.0)) == {"train/examples_per_s", "train/examples_per_s_per_device"}


def test_step_flops_reads_the_compiled_cost_analysis():
    import jax
    import jax.numpy as jnp

    a = jnp.ones((64, 32))
    compiled = jax.jit(lambda x, y: x @ y).lower(a, a.T).compile()
    flops = throughput.step_flops(compiled)
    assert flops == pytest.approx(2 * 64 * 32 * 64, rel=0.05)
    assert np.isfinite(flops)
