"""M-FLAG train step with and without the frozen-LM [CLS] cache, in one run.

`python -m medvlp_jax.bench mflag [--config=configs/mflag.py[:preset]] [--set a.b=v ...]`
builds the config's M-FLAG model and train state, draws real batches from its training data
(with the cache's `text_cls` field), and times the jitted train step (state donated) with the
cached field and without it (the frozen LM runs inside the step), alternating the two after a
warm-up call each. `--dropout` runs the no-cache step with the LM's dropout on, as the
released code does. Prints one JSON object: median step seconds of both, their ratio, the
cache build time and the trainable / total parameter counts, for the config and, in the
paper's terms, with a BERT-base-sized language model (CXR-BERT's size).

The CPU may be shared with other jobs: compare the ratio from one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from medvlp_jax import config as config_lib


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medvlp_jax.bench mflag", description=__doc__)
    p.add_argument("--config", default="configs/mflag.py", help="configs/mflag.py[:preset]")
    p.add_argument("--set", action="append", default=[], help="override a.b=value")
    p.add_argument("--repeats", type=int, default=5, help="timed steps of each kind")
    p.add_argument("--dropout", action="store_true", help="no-cache step with LM dropout on")
    return p.parse_args(argv)


def parameter_counts(config) -> dict:
    """Trainable / total counts for `config` and for the same model with a BERT-base LM."""
    import jax

    from medvlp_jax import optim
    from medvlp_jax.methods.mflag import MFlag, count_params
    from medvlp_jax.models.builders import tower_config
    from medvlp_jax.parallel.sharding import strip_boxes

    def counts(cfg) -> dict:
        method = MFlag(cfg)
        size = cfg.data.image_size
        shape = (2, size, size, cfg.model.image.channels)
        example = {"image": jax.ShapeDtypeStruct(shape, jax.numpy.float32)}
        params = strip_boxes(jax.eval_shape(method.init, jax.random.PRNGKey(0), example))["params"]
        rules = optim.group_rules(cfg.optim, method.group_rules())
        return count_params(params, optim.trainable_mask(rules, params))

    paper = config_lib.apply_overrides(config, [])
    paper.model.text = tower_config("bert", "base")
    return {"this_config": counts(config), "with_bert_base_lm": counts(paper)}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    import flax.linen as nn
    import jax

    from medvlp_jax import train
    from medvlp_jax.data import pipeline, sources, tokenize
    from medvlp_jax.methods.base import SetupContext, get_method
    from medvlp_jax.methods.mflag import TEXT_FIELD
    from medvlp_jax.parallel import mesh as mesh_lib
    from medvlp_jax.parallel.sharding import ACTIVATION_RULES

    config = config_lib.apply_overrides(config_lib.load_config_file(args.config), args.set)
    mesh = mesh_lib.make_mesh(config.mesh)
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    records = sources.load_records(config.data, "train")
    method = get_method(config)
    start = time.perf_counter()
    method.setup(SetupContext(config, Path(tempfile.mkdtemp()), mesh, tokenizer, records))
    cache_s = time.perf_counter() - start
    lm_config = config_lib.apply_overrides(
        config, [f"model.text_dropout_in_frozen_lm={args.dropout}"]
    )
    lm_method = get_method(lm_config)

    it = pipeline.train_iterator(
        config.data, records, tokenizer, seed=0, hooks=method.data_hooks(tokenizer)
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        cached = [mesh_lib.global_batch(mesh, next(it)) for _ in range(2)]
        plain = [{k: v for k, v in b.items() if k != TEXT_FIELD} for b in cached]
        state, shardings, tx, lr_fn, trainable = train.create_state(config, method, mesh, cached[0])
        steps = {}
        for name, m, batch in (("cached", method, cached[0]), ("lm", lm_method, plain[0])):
            steps[name] = train.jit_step(m, tx, lr_fn, trainable, shardings, batch, config.optim)
        batches = {"cached": cached, "lm": plain}
        times: dict[str, list[float]] = {"cached": [], "lm": []}
        for i in range(args.repeats + 1):  # the first round compiles
            for name in ("cached", "lm"):
                start = time.perf_counter()
                state, metrics = steps[name](state, batches[name][i % 2])
                jax.block_until_ready((state, metrics))
                if i:
                    times[name].append(time.perf_counter() - start)

    cached_s, lm_s = (statistics.median(times[k]) for k in ("cached", "lm"))
    result = {
        "config": args.config,
        "overrides": args.set,
        "batch_size": config.data.batch_size,
        "image_size": config.data.image_size,
        "text_tower": {k: config.model.text[k] for k in ("name", "width", "num_layers")},
        "max_text_len": config.data.max_text_len,
        "lm_dropout_without_cache": args.dropout,
        "repeats": args.repeats,
        "step_s_with_cache": round(cached_s, 4),
        "step_s_without_cache": round(lm_s, 4),
        "speedup_with_cache": round(lm_s / cached_s, 3),
        "cache_build_s": round(cache_s, 2),
        "cache_hit": method.cache_hit,
        "cached_texts": len({r.text for r in records}),
        "parameters": parameter_counts(config),
    }
    print(json.dumps(result, indent=2))
