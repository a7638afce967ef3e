"""`python -m medvlp_jax.bench quality --config=configs/clip.py[:preset] [--set a.b=v ...]`

Trains the config with its default budget in a fresh work directory and prints the final
evaluation metrics as JSON. A config with `bench.variants` ("name:a.b=v;c.d=w") is run once per
variant (e.g. MCPL's ablations), each in its own work directory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from medvlp_jax import config as config_lib


def _variants(config) -> list[tuple[str, list[str]]]:
    if not config.bench.variants:
        return [("default", [])]
    out = []
    for spec in config.bench.variants:
        name, _, overrides = spec.partition(":")
        out.append((name, [o for o in overrides.split(";") if o]))
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m medvlp_jax.bench quality")
    parser.add_argument("--config", required=True, help="configs/NAME.py[:preset]")
    parser.add_argument("--set", action="append", default=[], help="override a.b=value")
    parser.add_argument("--workdir", default="", help="default: a fresh temporary folder")
    args = parser.parse_args(argv)

    from medvlp_jax import stages, train

    base = config_lib.apply_overrides(config_lib.load_config_file(args.config), args.set)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="medvlp_quality_"))
    results = {}
    for name, overrides in _variants(base):
        config = config_lib.apply_overrides(base, overrides)
        start = time.time()
        metrics = train.run(config, root / name)
        results[name] = {
            "overrides": overrides,
            "steps": stages.total_steps(stages.resolve(config)),
            "wall_s": round(time.time() - start, 1),
            **{k: round(v, 4) for k, v in metrics.items()},
        }
    print(json.dumps({"config": args.config, "workdir": str(root), "results": results}, indent=2))
