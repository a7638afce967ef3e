"""What a person sees on the console: a start-up summary, step lines with an ETA, and a table
of metrics after each evaluation. Only process 0 prints. Library INFO chatter (Orbax, absl,
JAX) stays out unless `--verbosity` asks for it (`quiet_libraries`)."""

from __future__ import annotations

import logging

import jax

from medvlp_jax.parallel import mesh as mesh_lib

# Python loggers of libraries that log routine INFO lines on every save or compile.
CHATTY_LOGGERS = ("absl", "orbax", "jax", "grain", "etils", "tensorstore")


def quiet_libraries(verbosity: int) -> None:
    """Sets absl's and the chatty libraries' log level: `verbosity` -1 WARNING (the console
    default), 0 INFO, >= 1 DEBUG (absl's `--verbosity` when given)."""
    from absl import logging as absl_logging

    verbosity = min(max(verbosity, -1), 1)  # absl's own scale: -1 WARNING, 0 INFO, 1 DEBUG
    absl_logging.set_verbosity(verbosity)
    level = absl_logging.converter.absl_to_standard(verbosity)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def say(text: str) -> None:
    """Prints `text` on process 0."""
    if jax.process_index() == 0:
        print(text, flush=True)


def duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def count(n: int) -> str:
    """12345678 -> '12.3M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def startup_summary(config, mesh, stages, num_records: int, workdir) -> str:
    """The lines printed before the first step."""
    devices = mesh.devices.flatten()
    axes = " ".join(f"{name}={size}" for name, size in mesh.shape.items())
    per_shard = config.data.batch_size // mesh_lib.batch_shards(mesh)
    plan = ", ".join(f"{s.name} {s.num_steps}" for s in stages)
    return "\n".join(
        [
            f"medvlp_jax: method {config.method}, {len(devices)} {devices[0].platform} device(s) "
            f"in {jax.process_count()} process(es), mesh {axes}",
            f"data: {config.data.source}, {num_records} training records, batch "
            f"{config.data.batch_size} ({per_shard} per batch shard), "
            f"{config.data.image_size} px, {config.data.max_text_len} tokens",
            f"steps: {stages[-1].end} ({plan}); workdir {workdir}",
        ]
    )


def parameter_line(stage, n_stages: int, total: int, trainable: int, table_path) -> str:
    """One line of parameter totals for a stage."""
    steps = f"steps {stage.start + 1}-{stage.end}" if stage.num_steps else "no training steps"
    return (
        f"stage {stage.index + 1}/{n_stages} '{stage.name}': {steps}; "
        f"parameters {count(total)} (trainable {count(trainable)}, frozen "
        f"{count(total - trainable)}) -> {table_path}"
    )


def step_line(step: int, total: int, metrics: dict, seconds_per_step: float) -> str:
    """'step 10/200  loss 3.4512  lr 1.0e-03  45.1 ex/s  ETA 3m05s'."""
    parts = [f"step {step}/{total}", f"loss {float(metrics['train/loss']):.4f}"]
    if "train/lr" in metrics:
        parts.append(f"lr {float(metrics['train/lr']):.1e}")
    parts.append(f"{metrics['train/examples_per_s']:.1f} ex/s")
    if "train/mfu" in metrics:
        parts.append(f"MFU {100 * metrics['train/mfu']:.1f}%")
    parts.append(f"ETA {duration(seconds_per_step * (total - step))}")
    return "  ".join(parts)


def metrics_table(title: str, metrics: dict) -> str:
    """A compact two-column table of `{'eval/<dataset>/<metric>': value}`."""
    if not metrics:
        return f"{title}: no evaluators enabled"
    names = {k: k.split("/", 2)[-1] for k in metrics}
    width = max(len(n) for n in names.values())
    rows = [f"  {names[k]:<{width}}  {float(v):.4f}" for k, v in sorted(metrics.items())]
    return "\n".join([f"{title}:", *rows])
