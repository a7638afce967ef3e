"""`python -m medvlp_jax.downstream`: one downstream task on a pre-trained run.

    python -m medvlp_jax.downstream --pretrained=WORKDIR --task=TASK[:tiny] --fraction=F \\
        --workdir=OUT [--config.x=v ...]

TASK is `classification`, `segmentation` or `detection` (`configs/<TASK>.py`). The task's
config gets the pre-training run's config (WORKDIR/config.json) as `downstream.encoder`, its
weights as `init.encoder`, its input preprocessing and, unless overridden, its dataset. The
training split is cut to `data.label_fraction` = F by the split files (see
`medvlp_jax.data.label_fractions`). Then:

1. training: `train.run`, the trainer of pre-training (checkpoints, resume, sharded steps,
   console); the task's evaluator runs on the validate split, and the checkpoint with the best
   validate metric (`train.keep_best_metric`) is kept;
2. test: the kept checkpoint is evaluated once on the test split -> OUT/test.json. The test
   split is read here and nowhere else; a rerun after it finds test.json and only prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import ml_collections

from medvlp_jax import config as config_lib
from medvlp_jax import console, preflight, prerequisites
from medvlp_jax.data.config import default_data_config
from medvlp_jax.downstream.config import (
    DATA_LOCATION_FIELDS,
    ENCODER_INPUT_FIELDS,
    SELECTION_METRIC,
)
from medvlp_jax.downstream.method import TASKS, encoder_config
from medvlp_jax.weights import load_spec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TEST_FILE = "test.json"


def pretrained_config(workdir: Path) -> ml_collections.ConfigDict:
    """The pre-training run's config (WORKDIR/config.json); errors name the path."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise config_lib.ConfigError(f"--pretrained={workdir}: no config.json (not a run folder)")
    try:
        config = config_lib.from_json(path.read_text())
    except ValueError as e:
        raise config_lib.ConfigError(f"--pretrained: {path} is not valid JSON: {e}") from None
    if config.get("method") == "downstream":
        raise config_lib.ConfigError(
            f"--pretrained={workdir} is a downstream run, not a pre-training"
        )
    return config


def build_config(
    task: str, pretrained: Path, fraction: float, overrides: list[str]
) -> ml_collections.ConfigDict:
    """The downstream run config: `configs/<task>.py[:preset]` + the pre-training run +
    `--fraction` + `--config.x=v` overrides (checked, naming the closest key)."""
    name, _, preset = task.partition(":")
    if name not in TASKS:
        raise config_lib.ConfigError(f"--task={task}: expected one of {TASKS} (':tiny' optional)")
    config = config_lib.load_config_file(f"{CONFIGS / name}.py" + (f":{preset}" if preset else ""))
    encoder = pretrained_config(pretrained)
    inputs = encoder_config(encoder).data
    defaults = default_data_config()  # for fields newer than the run's config.json
    for key in (*ENCODER_INPUT_FIELDS, *DATA_LOCATION_FIELDS):
        config.data[key] = inputs.get(key, defaults[key])
    config.downstream.encoder = encoder
    config.init.encoder = load_spec(str(Path(pretrained).absolute()), into="encoder")
    if not 0 < fraction <= 1:
        raise config_lib.ConfigError(f"--fraction={fraction}: expected a fraction in (0, 1]")
    config.data.label_fraction = fraction
    config = config_lib.apply_overrides(config, overrides)
    config.train.keep_best_metric = f"eval/{config.data.source}/{SELECTION_METRIC[name]}"
    config_lib.validate(config)
    return config


def test_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with every evaluator on the test split."""
    out = ml_collections.ConfigDict(config.to_dict())
    for name in out.evals:
        out.evals[name].split = "test"
    return out


def best_step(workdir: Path, metric: str, steps: list[int], mode: str = "max") -> int:
    """The step among `steps` (those with a checkpoint) with the best `metric` in
    WORKDIR/metrics.jsonl (`mode` 'max' or 'min', as `train.keep_best_mode`); NaN counts as
    worst, ties go to the earliest step."""
    scores: dict[int, float] = {}
    path = Path(workdir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if metric in row and row["step"] in steps:
            scores[row["step"]] = row[metric]
    if not scores:
        raise RuntimeError(f"{path}: no {metric} recorded at the checkpointed steps {steps}")
    sign = 1.0 if mode == "max" else -1.0
    best = lambda step: -math.inf if math.isnan(scores[step]) else sign * scores[step]
    return max(sorted(scores), key=best)


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict | None:
    """Trains (or resumes) the downstream run in `workdir`, then evaluates its best-validate
    checkpoint on the test split once; returns `{'step': ..., test metrics}`, or None when a
    stop signal (SIGTERM, preemption) ended training early: no test evaluation then."""
    from medvlp_jax import checkpointing, train

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_lib.to_json(config))
    if not prerequisites.finished(config, workdir):  # a finished run is not re-evaluated
        train.run(config, workdir)
    if not prerequisites.finished(config, workdir):  # a stop signal ended training early
        console.say(f"training stopped before its last step; rerun to resume ({workdir})")
        return None
    test_file = workdir / TEST_FILE
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
    steps = ckpt.all_steps()
    ckpt.close()
    step = best_step(workdir, config.train.keep_best_metric, steps, config.train.keep_best_mode)
    if test_file.exists():
        done = json.loads(test_file.read_text())
        if done.get("step") == step:
            title = f"test evaluation at step {step} (from {test_file})"
            console.say(
                console.metrics_table(title, {k: v for k, v in done.items() if k != "step"})
            )
            return done
    console.say(f"model selection: step {step} has the best {config.train.keep_best_metric}")
    metrics = train.evaluate_checkpoint(test_config(config), workdir, step, output=TEST_FILE)
    return {"step": step, **metrics}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m medvlp_jax.downstream",
        description="Fine-tune or probe a pre-trained run on a downstream task.",
    )
    parser.add_argument("--pretrained", required=True, help="a pre-training run's workdir")
    parser.add_argument("--task", required=True, help=f"one of {TASKS}, optionally ':tiny'")
    parser.add_argument("--fraction", type=float, default=1.0, help="label fraction (0, 1]")
    parser.add_argument("--workdir", required=True, help="the downstream run's workdir")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    overrides = [a[len("--config.") :] for a in rest]
    try:
        config = build_config(args.task, Path(args.pretrained), args.fraction, overrides)
    except config_lib.ConfigError as e:
        sys.exit(f"config error: {e}")
    from medvlp_jax.parallel import distributed

    console.quiet_libraries(-1)
    distributed.setup_logging()
    distributed.initialize(config.distributed)
    with distributed.exit_on_failure():
        try:
            preflight.check_workdir(args.workdir)
        except preflight.WorkdirError as e:
            sys.exit(f"workdir error: {e}")
        run(config, Path(args.workdir))
