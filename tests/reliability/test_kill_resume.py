"""kill -9 at random points of a run (a step, an asynchronous save, an evaluation), several
times over, then a rerun: it resumes from a complete step and ends with the parameters of an
uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tinyconfigs import ROOT, cli, tiny_clip

from medvlp_jax import train

STEPS = 16
_RUN = (
    "optim.schedule=constant",
    f"train.num_steps={STEPS}",
    "train.checkpoint_every=1",  # an asynchronous save is always in flight
    "train.eval_every=4",
    "train.log_every=1",
    "evals.retrieval.enabled=true",
    "evals.retrieval.max_examples=16",
)


def _env(cache: Path) -> dict[str, str]:
    """The runs share a compilation cache: each rerun skips the compile, not the work."""
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def _cli(workdir: Path) -> list[str]:
    return cli(workdir, "evals.zero_shot.enabled=false", "evals.linear_probe.enabled=false", *_RUN)


def _kill_after_first_step(args, delay_s: float, env: dict) -> str:
    """Starts the command, kills it (SIGKILL) `delay_s` after its first step line or resume
    line; returns what it printed."""
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    started = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("step ", "evaluation")):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started.wait(timeout=240)
    time.sleep(delay_s)
    proc.kill()
    proc.wait()
    reader.join(timeout=10)
    return "".join(lines)


def _final_state(workdir: Path) -> list[np.ndarray]:
    step_dir = workdir / "checkpoints" / str(STEPS) / "state"
    return jax.tree.leaves(ocp.StandardCheckpointer().restore(step_dir))


def test_repeated_kill_9_resumes_to_the_uninterrupted_parameters(tmp_path):
    reference = tmp_path / "straight"
    train.run(tiny_clip(*_RUN), reference)

    workdir = tmp_path / "killed"
    env = _env(tmp_path / "xla_cache")
    draw = random.Random(0)
    outputs = [_kill_after_first_step(_cli(workdir), draw.uniform(1.0, 6.0), env) for _ in range(3)]
    done = subprocess.run(
        _cli(workdir), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    resumed = [o for o in [*outputs[1:], done.stdout] if "resuming from step" in o]
    assert resumed, "no run resumed from a checkpoint"
    for a, b in zip(_final_state(workdir), _final_state(reference), strict=True):
        np.testing.assert_array_equal(a, b)
