"""`python -m medvlp_jax.bench quality --config=configs/clip.py[:preset] [--set a.b=v ...]`

Trains the config with its default budget in a fresh work directory and prints the final
evaluation metrics as JSON. A config with `bench.variants` ("name:a.b=v;c.d=w") is run once per
variant (e.g. MCPL's ablations), each in its own work directory; `--sweep=a.b:v1,v2,...` runs
it once per value of one field instead (e.g. PTUnifier's pool size), then prints a table.
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


def _sweep(spec: str) -> list[tuple[str, list[str]]]:
    key, sep, values = spec.partition(":")
    if not sep or not key or not values:
        raise SystemExit(f"--sweep={spec!r}: expected FIELD:VALUE,VALUE,... (a.b.c:1,2,3)")
    return [(f"{key}={v}", [f"{key}={v}"]) for v in values.split(",") if v]


def _table(results: dict) -> str:
    metrics = sorted({k for r in results.values() for k in r if k.startswith("eval/")})
    short = [m.split("/", 2)[-1] for m in metrics]
    lines = ["| variant | " + " | ".join(short) + " |", "|---" * (len(short) + 1) + "|"]
    for name, r in results.items():
        cells = [f"{r[m]:.3f}" if m in r else "-" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m medvlp_jax.bench quality")
    parser.add_argument("--config", required=True, help="configs/NAME.py[:preset]")
    parser.add_argument("--set", action="append", default=[], help="override a.b=value")
    parser.add_argument("--workdir", default="", help="default: a fresh temporary folder")
    parser.add_argument("--sweep", default="", help="FIELD:V1,V2,...: one run per value")
    args = parser.parse_args(argv)

    from medvlp_jax import stages, train

    base = config_lib.apply_overrides(config_lib.load_config_file(args.config), args.set)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="medvlp_quality_"))
    results = {}
    variants = _sweep(args.sweep) if args.sweep else _variants(base)
    for name, overrides in variants:
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
    if args.sweep:
        print(_table(results))
