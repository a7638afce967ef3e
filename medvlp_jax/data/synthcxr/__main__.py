"""CLI: python -m medvlp_jax.data.synthcxr --out DIR --num-studies N --image-size S --seed K."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from medvlp_jax.data.synthcxr.dataset import generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medvlp_jax.data.synthcxr", description=__doc__)
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    parser.add_argument("--num-studies", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--zero-shot-per-class",
        type=int,
        default=None,
        help="N of the 5 x N zero-shot list (default: num_studies // 50, <= 200)",
    )
    parser.add_argument("--workers", type=int, default=1, help="rendering processes")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} exists and is not empty")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        generate(
            tmp,
            args.num_studies,
            args.image_size,
            args.seed,
            args.zero_shot_per_class,
            workers=args.workers,
        )
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((out / "synthcxr.json").read_text())
    info["seconds"] = round(time.perf_counter() - start, 2)
    info["root"] = str(out)
    json.dump(info, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
