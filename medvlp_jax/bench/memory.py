"""Per-device memory of the train step under each sharding strategy, compiled ahead of time.

    python -m medvlp_jax.bench memory [--config=configs/clip.py:base] [--batch_size=64]
        [--devices=8] [--strategies=dp,fsdp,fsdp_tp] [--override=KEY=VALUE ...] [--out=FILE]

For each strategy (`config.mesh.strategy`: 'dp' = data 8, the replicated baseline; 'fsdp' =
fsdp 8; 'fsdp_tp' = fsdp 4 x tensor 2) this builds the abstract, sharded train state
(`train.abstract_state`: `jax.eval_shape`, nothing allocated), lowers and compiles the real
train step (`train.jit_step`, state donated) on `--devices` simulated CPU devices, and
reads XLA's `compiled.memory_analysis()` of the per-device program:

  argument_bytes  state + batch shard held by one device on entry
  output_bytes    new state + metrics
  alias_bytes     outputs written in place of donated arguments (the state)
  temp_bytes      temporaries: activations kept for the backward pass, gradients, workspace
  peak_bytes      argument + output - alias + temp (live at once in the worst case)

plus `state_bytes` (params / opt_state / total), summed from the shardings' shard shapes as an
independent check of what XLA reports, the fraction of parameter elements each strategy leaves
replicated, and every number's ratio to 'dp'. Prints one JSON object.

Compiling ViT-B/16 + BERT-base on a 2-core CPU takes minutes per strategy; the numbers depend
only on shapes and shardings, not on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from jax._src import xla_bridge

from medvlp_jax import config as config_lib
from medvlp_jax import train
from medvlp_jax.methods.base import SetupContext, get_method
from medvlp_jax.parallel import mesh as mesh_lib
from medvlp_jax.parallel.sharding import ACTIVATION_RULES

DEFAULT_CONFIG = "configs/clip.py:base"
STRATEGY_LABELS = {
    "dp": "replicated (data parallel)",
    "fsdp": "FSDP",
    "fsdp_tp": "FSDP + tensor parallel",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medvlp_jax.bench memory", description=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config file[:preset]")
    p.add_argument("--batch_size", type=int, default=64, help="global batch")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--strategies", default="dp,fsdp,fsdp_tp")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override as on the command line, without --config. (repeatable)",
    )
    p.add_argument("--out", default="", help="also write the JSON here")
    return p.parse_args(argv)


def use_cpu_devices(count: int) -> None:
    """Makes JAX run on `count` simulated CPU devices (set before its backend starts, like
    XLA_FLAGS=--xla_force_host_platform_device_count), or checks that it already has them."""
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    if jax.device_count() != count:
        raise SystemExit(
            f"--devices={count}, but JAX already runs with {jax.device_count()} devices"
        )


def abstract_batch(config, batch_size: int) -> dict:
    """The training batch as `jax.ShapeDtypeStruct`s (fields of `data.pipeline.train_iterator`)."""
    d = config.data
    shapes = {
        "image": ((batch_size, d.image_size, d.image_size, d.channels), np.float32),
        "input_ids": ((batch_size, d.max_text_len), np.int32),
        "attention_mask": ((batch_size, d.max_text_len), np.int32),
        "labels": ((batch_size, 14), np.float32),
        "label_mask": ((batch_size, 14), np.float32),
        "index": ((batch_size,), np.int32),
    }
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def sharded_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded `jax.ShapeDtypeStruct`s (the largest shard)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def replicated_fraction(params) -> float:
    """Fraction of parameter elements that no mesh axis splits (every device holds them)."""
    leaves = jax.tree.leaves(params)
    total = sum(math.prod(x.shape) for x in leaves)
    full = sum(math.prod(x.shape) for x in leaves if x.sharding.is_fully_replicated)
    return full / max(total, 1)


@dataclasses.dataclass(frozen=True)
class AbstractStep:
    """The train step of one config under one strategy, as shapes and shardings only.

    `state` is a TrainState and `batch` a dict of sharded `jax.ShapeDtypeStruct`s; `step_fn`
    the jitted train step (state donated), as `train.run` builds it.
    """

    mesh: jax.sharding.Mesh
    state: object
    batch: dict
    step_fn: object

    def compile(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(ACTIVATION_RULES):
            return self.step_fn.lower(self.state, self.batch).compile()


def abstract_step(config, strategy: str, batch_size: int) -> AbstractStep:
    """`config`'s train step on the current devices under `mesh.strategy=strategy`, with a
    global batch of `batch_size`; nothing is allocated."""
    config = config_lib.apply_overrides(config, [f"mesh.strategy={strategy}"])
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_divides(mesh, batch_size, "--batch_size")
    method = get_method(config)
    method.setup(SetupContext(config, Path("/nonexistent"), mesh, None, []))
    plain = abstract_batch(config, batch_size)
    batch_shardings = {k: mesh_lib.batch_sharding(mesh, v.ndim) for k, v in plain.items()}
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
        for k, v in plain.items()
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        state, shardings, tx, lr_fn, trainable = train.abstract_state(config, method, mesh, batch)
    step_fn = train.jit_step(method, tx, lr_fn, trainable, shardings, batch, config.optim)
    return AbstractStep(mesh, state, batch, step_fn)


def measure(config, strategy: str, batch_size: int) -> dict:
    """Compiles the train step of `config` under `strategy`; per-device memory numbers."""
    start = time.perf_counter()
    step = abstract_step(config, strategy, batch_size)
    stats = step.compile().memory_analysis()
    seconds = time.perf_counter() - start
    xla = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
    }
    xla["peak_bytes"] = (
        xla["argument_bytes"] + xla["output_bytes"] - xla["alias_bytes"] + xla["temp_bytes"]
    )
    return {
        "label": STRATEGY_LABELS.get(strategy, strategy),
        "mesh": dict(step.mesh.shape),
        "state_bytes": {
            "params": sharded_bytes(step.state.params),
            "opt_state": sharded_bytes(step.state.opt_state),
            "total": sharded_bytes(step.state),
        },
        "batch_bytes": sharded_bytes(step.batch),
        "replicated_param_fraction": round(replicated_fraction(step.state.params), 6),
        **xla,
        "compile_s": round(seconds, 1),
    }


def with_ratios(results: dict, baseline: str) -> dict:
    """Adds `ratio_to_<baseline>` (state total, argument, temp and peak bytes) to each entry."""
    base = results.get(baseline)
    if base is None:
        return results
    for entry in results.values():
        entry[f"ratio_to_{baseline}"] = {
            "state": round(entry["state_bytes"]["total"] / base["state_bytes"]["total"], 4),
            **{
                key.removesuffix("_bytes"): round(entry[key] / max(base[key], 1), 4)
                for key in ("argument_bytes", "temp_bytes", "peak_bytes")
            },
        }
    return results


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    use_cpu_devices(args.devices)
    config = config_lib.apply_overrides(
        config_lib.load_config_file(args.config), [f"data.batch_size={args.batch_size}"]
    )
    config = config_lib.apply_overrides(config, args.override)
    strategies = [s for s in args.strategies.split(",") if s]
    results = {s: measure(config, s, args.batch_size) for s in strategies}
    m = config.model
    report = {
        "config": args.config,
        "overrides": args.override,
        "devices": args.devices,
        "global_batch": args.batch_size,
        "image_size": config.data.image_size,
        "text_len": config.data.max_text_len,
        "model": {
            "image": f"{m.image.name} {m.image.num_layers}x{m.image.width}/{m.image.patch_size}",
            "text": f"{m.text.name} {m.text.num_layers}x{m.text.width}",
        },
        "optimizer": config.optim.name,
        "strategies": with_ratios(results, "dp"),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
