"""`python -m medvlp_jax.bench suite`: every method's pre-training, then every downstream task
at every label fraction, on one protocol; writes the results page.

    python -m medvlp_jax.bench suite [--methods clip,mflag,mcpl,ptunifier,prior]
        [--tasks classification,segmentation,detection] [--fractions 0.01,0.1,1]
        [--rows coop,mcpl,...] [--preset ''|tiny] [--workdir DIR] [--results docs/results.md]
        [--set a.b=v ...]

Rows are methods; MCPL contributes its prompt-learning baselines beside itself (`MCPL_ROWS`:
the frozen backbone without prompts, CoOp-style text prompts, MaPLe-style coupled prompts,
MCPL), so "MCPL above both" is measured on the same protocol. Each row pre-trains into
`DIR/pretrain/<row>` (a finished run is reused), then each task and fraction runs through
`medvlp_jax.downstream.runner` into `DIR/<row>/<task>@<fraction>` (a finished one is reused:
the runner keeps its test result). `--set` overrides go to every downstream run. Model
selection is on the validate split; the figures are the test split's, read once per run.

Compiled programs are cached in `DIR/xla_cache` (unless `JAX_COMPILATION_CACHE_DIR` says
where), so the runs of one task at its fractions compile once. Writes `DIR/suite.json`
(every test metric of every run) and the results page: one table per
task (rows: methods; columns: fractions; the task's headline metric), the wall time of each
run, and a PNG plot beside the page (`<results stem>.png`, headline metric against the label
fraction).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import ml_collections

from medvlp_jax import config as config_lib
from medvlp_jax import prerequisites
from medvlp_jax.downstream import runner
from medvlp_jax.downstream.config import SELECTION_METRIC as HEADLINE
from medvlp_jax.downstream.method import TASKS
from medvlp_jax.downstream.runner import CONFIGS

METHODS = ("clip", "mflag", "mcpl", "ptunifier", "prior")
# MCPL's rows: its frozen backbone (the prerequisite run, no prompts), then its
# `bench.variants` (configs/mcpl.py ABLATIONS) by name -> row label.
MCPL_BACKBONE_ROW = "mcpl:backbone"
MCPL_ROWS = {"coop": "coop", "maple": "maple", "mcpl_qk_v": "mcpl"}


def pretrain_rows(methods, preset: str) -> list[tuple[str, ml_collections.ConfigDict, str]]:
    """(row label, pre-training config, prerequisite name) per row, in `methods` order; a
    row with a prerequisite name is that prerequisite's run (MCPL's frozen backbone)."""
    rows = []
    for method in methods:
        spec = f"{CONFIGS / method}.py" + (f":{preset}" if preset else "")
        config = config_lib.load_config_file(spec)
        if method != "mcpl":
            rows.append((method, config, ""))
            continue
        rows.append((MCPL_BACKBONE_ROW, config, "backbone"))
        variants = dict(v.partition(":")[::2] for v in config.bench.variants)
        for name, label in MCPL_ROWS.items():
            overrides = [o for o in variants[name].split(";") if o]
            rows.append((label, config_lib.apply_overrides(config, overrides), ""))
    return rows


def pretrain(config: ml_collections.ConfigDict, workdir: Path, prerequisite: str = "") -> Path:
    """The row's pre-trained run folder: `config` trained into `workdir` as `main` would
    (config.json first) unless finished there, or the prerequisite run it names."""
    from medvlp_jax import train

    if prerequisite:
        return prerequisites.ensure(config, prerequisite)
    if not prerequisites.finished(config, workdir):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config_lib.to_json(config))
        train.run(config, workdir)
        if not prerequisites.finished(config, workdir):
            raise SystemExit(
                f"pre-training in {workdir} stopped before its last step; rerun "
                "the suite to resume it"
            )
    return workdir


def _record(path: Path, row: str, task: str, fraction: str, entry: dict) -> None:
    """Adds one run's result to the suite record at `path` as it is on disk now, so that
    suites running side by side on other rows keep each other's entries."""
    current = json.loads(path.read_text()) if path.exists() else {}
    current.setdefault(row, {}).setdefault(task, {})[fraction] = entry
    path.write_text(json.dumps(current, indent=2))


def _metric(result: dict, task: str) -> float | None:
    key = next((k for k in result if k.endswith("/" + HEADLINE[task])), None)
    return None if key is None else result[key]


def results_page(suite: dict, fractions, preset: str, plot_name: str) -> str:
    """The markdown page of `suite` ({row: {task: {fraction: result}}})."""
    lines = [
        "# Downstream results",
        "",
        "Written by `python -m medvlp_jax.bench suite"
        + (f" --preset={preset}" if preset else "")
        + "`; every figure is the test split's, at the checkpoint with the best validate "
        "metric (the test split is read once per run). Rows pre-train with their config's "
        "default budget on SynthCXR; see the README for the machine.",
        "",
        f"![headline metrics against the label fraction]({plot_name})",
    ]
    for task in TASKS:
        if not any(task in tasks for tasks in suite.values()):
            continue
        header = " | ".join(f"{100 * f:g}%" for f in fractions)
        lines += ["", f"## {task} ({HEADLINE[task]})", "", f"| method | {header} | wall |"]
        lines.append("|---" * (len(fractions) + 2) + "|")
        for row, tasks in suite.items():
            if task not in tasks:
                continue
            cells, wall = [], 0.0
            for f in fractions:
                result = tasks[task].get(f"{f:g}")
                value = None if result is None else _metric(result, task)
                cells.append("-" if value is None else f"{value:.3f}")
                wall += 0 if result is None else result.get("wall_s", 0)
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {wall:.0f} s |")
    return "\n".join(lines) + "\n"


def plot(suite: dict, fractions, path: Path) -> None:
    """Headline metric against the label fraction, one panel per task, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(t in v for v in suite.values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for row, by_task in suite.items():
            points = [
                (f, _metric(by_task[task][f"{f:g}"], task))
                for f in fractions
                if task in by_task and f"{f:g}" in by_task[task]
            ]
            points = [(f, v) for f, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=row)
        ax.set_xscale("log")
        ax.set_xticks(list(fractions), [f"{100 * f:g}%" for f in fractions])
        ax.set_xlabel("labelled training data")
        ax.set_ylabel(f"test {HEADLINE[task]}")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m medvlp_jax.bench suite")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rows", default="", help="only these rows (default: every row)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--fractions", default="0.01,0.1,1")
    parser.add_argument("--preset", default="", help="'' or 'tiny' (pre-training and tasks)")
    parser.add_argument("--workdir", default="suite", help="where every run lives")
    parser.add_argument("--results", default="docs/results.md", help="the page to write")
    parser.add_argument("--set", action="append", default=[], help="downstream a.b=value")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown methods/tasks {unknown}; methods {METHODS}, tasks {TASKS}")
    fractions = [float(f) for f in args.fractions.split(",") if f]

    root = Path(args.workdir)
    if not jax.config.jax_compilation_cache_dir:
        # Every fraction of a task runs the same programs: compile them once per suite.
        jax.config.update("jax_compilation_cache_dir", str(root / "xla_cache"))
    record = root / "suite.json"
    earlier = json.loads(record.read_text()) if record.exists() else {}
    suite: dict = {}
    rows = pretrain_rows(methods, args.preset)
    wanted = [r for r in args.rows.split(",") if r] or [r[0] for r in rows]
    missing = sorted(set(wanted) - {r[0] for r in rows})
    if missing:
        raise SystemExit(f"--rows: {missing} are not rows of {methods}: {[r[0] for r in rows]}")
    for row, config, prerequisite in (r for r in rows if r[0] in wanted):
        print(f"== {row}: pre-training", flush=True)
        folder = row.replace(":", "_")
        pretrained = pretrain(config, root / "pretrain" / folder, prerequisite)
        for task in tasks:
            for fraction in fractions:
                print(f"== {row}: {task} at {100 * fraction:g}% of the labels", flush=True)
                spec = f"{task}:{args.preset}" if args.preset else task
                down = runner.build_config(spec, pretrained, fraction, args.set)
                workdir = root / folder / f"{task}@{fraction:g}"
                reused = (workdir / runner.TEST_FILE).exists()
                start = time.time()
                result = runner.run(down, workdir)
                if result is None:
                    raise SystemExit("suite stopped by a signal; rerun it to resume")
                key = f"{fraction:g}"
                wall = earlier.get(row, {}).get(task, {}).get(key, {}).get("wall_s")
                if not (reused and wall is not None):  # a reused run keeps its first time
                    wall = round(time.time() - start, 1)
                entry = {**result, "wall_s": wall}
                suite.setdefault(row, {}).setdefault(task, {})[key] = entry
                _record(record, row, task, key, entry)
    page = Path(args.results)
    page.parent.mkdir(parents=True, exist_ok=True)
    plot(suite, fractions, page.with_suffix(".png"))
    page.write_text(results_page(suite, fractions, args.preset, page.with_suffix(".png").name))
    print(page.read_text())
