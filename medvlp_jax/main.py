"""Command-line entry point.

    python -m medvlp_jax.main --config=configs/mcpl.py --workdir=/tmp/run [--config.a.b=v ...]

`--config=FILE:ARG` passes ARG to the file's `get_config` (e.g. `configs/clip.py:tiny`).
Overrides are checked before anything runs: an unknown key fails naming the closest valid one,
and every value is checked (`config.validate`: choices, counts, intervals) before the
distributed start-up; then the workdir and its checkpoints folder must be writable folders.
`--config.mode=eval` evaluates WORKDIR's latest checkpoint (or `--config.eval_step=N`).
Library log lines below WARNING stay off the console unless `--verbosity=0` (INFO) or more.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from medvlp_jax import config as config_lib
from medvlp_jax import preflight

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def _preflight(argv: list[str]) -> None:
    """Checks the config file and overrides before absl parses them (clearer errors)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return
    try:
        config = config_lib.load_config_file(spec)
        config_lib.check_overrides(config, argv)
    except config_lib.ConfigError as e:
        sys.exit(f"config error: {e}")


def _print_batch_summary(config, workdir: Path) -> None:
    """`--config.mode=data`: builds the training pipeline, with the fields the (first stage's)
    method adds, and prints one batch's fields."""
    import jax

    from medvlp_jax import stages
    from medvlp_jax.data import pipeline, sources, tokenize
    from medvlp_jax.methods.base import SetupContext, get_method
    from medvlp_jax.parallel import mesh as mesh_lib

    config = stages.resolve(config)[0].config
    records = sources.load_records(config.data, "train")
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    mesh = mesh_lib.make_mesh(config.mesh)
    method = get_method(config)
    method.setup(SetupContext(config, workdir, mesh, tokenizer, records))
    batches = pipeline.train_iterator(
        config.data,
        records,
        tokenizer,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        hooks=method.data_hooks(tokenizer),
    )
    batch = next(batches)
    print(f"{len(records)} training records; one batch:")
    for name, value in sorted(batch.items()):
        print(f"  {name:16s} {value.dtype!s:8s} {tuple(value.shape)}")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        sys.exit(f"config error: {e}")

    from medvlp_jax import console
    from medvlp_jax.parallel import distributed

    verbosity = flags.FLAGS["verbosity"]
    console.quiet_libraries(verbosity.value if verbosity.present else -1)
    distributed.setup_logging()
    distributed.initialize(config.distributed)
    with distributed.exit_on_failure():
        _run(config, Path(_WORKDIR.value))


def _run(config, workdir: Path) -> None:
    """Checks the workdir, writes the resolved config, then runs the configured mode."""
    try:
        preflight.check_workdir(workdir)
    except preflight.WorkdirError as e:
        sys.exit(f"workdir error: {e}")

    import jax

    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config_lib.to_json(config))
    logging.info("config written to %s", workdir / "config.json")

    if config.mode == "data":
        _print_batch_summary(config, workdir)
        return

    from medvlp_jax import train

    try:
        if config.mode == "eval":
            train.evaluate_checkpoint(config, workdir, config.eval_step)
        else:
            train.run(config, workdir)
    except _user_facing_errors() as e:
        # Their messages name the cause and what was kept; a traceback would bury them.
        sys.exit(f"error: {e}")


def _user_facing_errors() -> tuple[type[Exception], ...]:
    """Failures whose message says all a user needs: a non-finite step, a damaged, foreign
    or unwritable checkpoint, a bad record under data.on_bad_record=error."""
    from medvlp_jax import checkpointing, nonfinite
    from medvlp_jax.data.bad_records import BadRecordError

    return (
        nonfinite.NonFiniteError,
        checkpointing.CheckpointDamagedError,
        checkpointing.CheckpointMismatchError,
        checkpointing.CheckpointSaveError,
        BadRecordError,
    )


if __name__ == "__main__":
    _preflight(sys.argv[1:])
    app.run(main)
