"""Soak test: train, evaluate and checkpoint in a loop; report host memory growth and errors.

    python -m medvlp_jax.bench soak [--minutes=30] [--config=configs/clip.py:tiny]
        [--steps_per_round=20] [--workdir=DIR] [--set KEY=VALUE ...]

Each round resumes the same run for `--steps_per_round` more steps through `train.run` (the
code path of `main`): restore, train with the evaluators and asynchronous saves on schedule
(an evaluation and a save every round), close. The process's resident memory (VmRSS) is read
after every round; the growth rate is the least-squares slope over the rounds after the first
(which pays for compilation and caches), in MiB per hour. Flat memory is the target: a leak
of a few MiB a round shows as hundreds of MiB per hour. Any exception ends the soak and is
printed with the round it ended. Prints one line per round, then a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
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
    """Least-squares slope of `mib` over `hours`, skipping the first round (MiB/h)."""
    if len(hours) < 3:
        return None
    return float(np.polyfit(hours[1:], mib[1:], 1)[0])


def _round_config(spec: str, overrides: list[str], steps: int):
    """The config file with an evaluation, two saves and one log line per round of `steps`."""
    return config_lib.apply_overrides(
        config_lib.load_config_file(spec),
        [
            f"train.eval_every={steps}",
            f"train.checkpoint_every={max(steps // 2, 1)}",
            f"train.log_every={steps}",
            *overrides,
        ],
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m medvlp_jax.bench soak")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--config", default="configs/clip.py:tiny")
    parser.add_argument("--steps_per_round", type=int, default=20)
    parser.add_argument("--workdir", default="", help="default: a fresh temporary folder")
    parser.add_argument("--set", action="append", default=[], help="config override a.b=v")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.steps_per_round < 1:
        raise SystemExit("--minutes must be > 0 and --steps_per_round >= 1")

    from medvlp_jax import console, train

    console.quiet_libraries(-1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    start, hours, mib, error = time.time(), [], [], None
    round_ = 0
    while time.time() - start < 60 * args.minutes:
        round_ += 1
        steps = round_ * args.steps_per_round
        config = _round_config(
            args.config, [*args.set, f"train.num_steps={steps}"], args.steps_per_round
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the run's own console
                train.run(config, workdir)
        except Exception:  # the soak reports any failure, then stops
            error = f"round {round_} (steps to {steps}): {traceback.format_exc()}"
            break
        hours.append((time.time() - start) / 3600)
        mib.append(rss_mib())
        print(
            f"round {round_}: step {steps}  RSS {mib[-1]:.0f} MiB  {60 * hours[-1]:.1f} min",
            flush=True,
        )
    summary = {
        "config": args.config,
        "workdir": str(workdir),
        "rounds": len(mib),
        "minutes": round((time.time() - start) / 60, 2),
        "rss_mib_first": mib[0] if mib else None,
        "rss_mib_last": mib[-1] if mib else None,
        "rss_growth_mib_per_hour": growth_per_hour(hours, mib),
        "error": error,
    }
    print(json.dumps(summary, indent=2))
    if error:
        raise SystemExit(1)
