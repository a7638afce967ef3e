"""Training-pipeline throughput: `python -m medvlp_jax.bench data [--workers 0,2 ...]`.

Reads a SynthCXR tree from the cache (generated on first use: `--num-studies` at
`--source-size` px), builds the training pipeline (decode, random resized crop, affine,
normalise, tokenise, batch) at `--image-size` for each worker count, and times `--batches`
batches after the first one (worker start-up is reported separately as first_batch_s).
Prints one JSON object. The CPU may be shared: compare settings within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medvlp_jax.bench data", description=__doc__)
    p.add_argument("--num-studies", type=int, default=200)
    p.add_argument("--source-size", type=int, default=128, help="SynthCXR image side, px")
    p.add_argument("--image-size", type=int, default=224, help="pipeline output side, px")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=10, help="timed batches per setting")
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--cache-dir", default="", help="default: $MEDVLP_JAX_CACHE or ~/.cache")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    from medvlp_jax.data.config import default_data_config
    from medvlp_jax.data.pipeline import train_iterator
    from medvlp_jax.data.sources import load_records
    from medvlp_jax.data.tokenize import load_tokenizer

    cfg = default_data_config()
    cfg.cache_dir = args.cache_dir
    cfg.synthcxr.num_studies = args.num_studies
    cfg.synthcxr.image_size = args.source_size
    cfg.image_size, cfg.batch_size, cfg.prefetch = args.image_size, args.batch_size, args.prefetch
    start = time.perf_counter()
    records = load_records(cfg, "train")
    load_s = time.perf_counter() - start
    tokenizer = load_tokenizer(cfg.tokenizer)
    out = {
        "bench": "data",
        "records": len(records),
        "load_records_s": round(load_s, 3),
        "image_size": args.image_size,
        "source_size": args.source_size,
        "batch_size": args.batch_size,
        "timed_batches": args.batches,
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for workers in (int(w) for w in args.workers.split(",")):
        cfg.num_workers = workers
        it = train_iterator(cfg, records, tokenizer, seed=0)
        try:
            t0 = time.perf_counter()
            next(it)
            t1 = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            t2 = time.perf_counter()
        finally:
            it.close()
        out[f"workers_{workers}"] = {
            "examples_per_s": round(args.batches * args.batch_size / (t2 - t1), 1),
            "first_batch_s": round(t1 - t0, 3),
        }
    print(json.dumps(out, indent=2))
