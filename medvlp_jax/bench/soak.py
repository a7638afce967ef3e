"""Soak test: one long run that trains, evaluates and checkpoints over and over; reports host
memory growth and any error.

    python -m medvlp_jax.bench soak [--minutes=30] [--config=configs/clip.py:tiny]
        [--eval_every=20] [--sample_s=10] [--workdir=DIR] [--set KEY=VALUE ...]

The run goes through `train.run` (the code path of `main`) with an evaluation every
`--eval_every` steps and an asynchronous save every half of that, so every part of the loop
repeats many times. After `--minutes` the bench sends itself SIGTERM: the run saves the step
it reached and returns, as on a preemption. A thread reads the process's resident memory
(VmRSS) every `--sample_s` seconds. The growth rate is the least-squares slope over the
samples after the first quarter of the run (compilation, first evaluation and caches), in
MiB per hour; flat memory is the target. Any exception ends the soak and is printed. Prints
one line per sample, then a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from medvlp_jax import config as config_lib


def rss_mib() -> float:
    """This process's resident memory in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def growth_per_hour(hours: list[float], mib: list[float]) -> float | None:
    """Least-squares slope of `mib` over `hours` (MiB/h) after the first quarter of the
    samples; None with fewer than 4 samples left."""
    skip = len(hours) // 4
    if len(hours) - skip < 4:
        return None
    return float(np.polyfit(hours[skip:], mib[skip:], 1)[0])


def _soak_config(spec: str, eval_every: int, overrides: list[str]):
    """The config file as one endless run with an evaluation every `eval_every` steps and a
    save every half of that."""
    return config_lib.apply_overrides(
        config_lib.load_config_file(spec),
        [
            "train.num_steps=100000000",
            f"train.eval_every={eval_every}",
            f"train.checkpoint_every={max(eval_every // 2, 1)}",
            f"train.log_every={eval_every}",
            *overrides,
        ],
    )


def _sample(samples: list[tuple[float, float]], start: float, every_s: float, done) -> None:
    while not done.wait(every_s):
        samples.append(((time.time() - start) / 3600, rss_mib()))
        print(f"{60 * samples[-1][0]:6.1f} min  RSS {samples[-1][1]:.0f} MiB", file=sys.stderr)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m medvlp_jax.bench soak")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--config", default="configs/clip.py:tiny")
    parser.add_argument("--eval_every", type=int, default=20)
    parser.add_argument("--sample_s", type=float, default=10.0)
    parser.add_argument("--workdir", default="", help="default: a fresh temporary folder")
    parser.add_argument("--set", action="append", default=[], help="config override a.b=v")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.eval_every < 2 or args.sample_s <= 0:
        raise SystemExit("--minutes and --sample_s must be > 0 and --eval_every >= 2")

    from medvlp_jax import console, train

    console.quiet_libraries(-1)
    config = _soak_config(args.config, args.eval_every, args.set)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    start, samples, done = time.time(), [], threading.Event()
    timer = threading.Timer(60 * args.minutes, os.kill, (os.getpid(), signal.SIGTERM))
    sampler = threading.Thread(target=_sample, args=(samples, start, args.sample_s, done))
    timer.start()
    sampler.start()
    error, steps = None, None
    try:
        with contextlib.redirect_stdout(io.StringIO()) as console_text:  # the run's own console
            train.run(config, workdir)
        steps = [line for line in console_text.getvalue().splitlines() if line.startswith("step ")]
    except Exception:  # the soak reports any failure, then stops
        error = traceback.format_exc()
    finally:
        timer.cancel()
        done.set()
        sampler.join()
    hours, mib = [h for h, _ in samples], [m for _, m in samples]
    summary = {
        "config": args.config,
        "workdir": str(workdir),
        "minutes": round((time.time() - start) / 60, 2),
        "last_step_line": steps[-1] if steps else None,
        "samples": len(samples),
        "rss_mib_first": mib[0] if mib else None,
        "rss_mib_last": mib[-1] if mib else None,
        "rss_growth_mib_per_hour": growth_per_hour(hours, mib),
        "error": error,
    }
    print(json.dumps(summary, indent=2))
    if error:
        raise SystemExit(1)
