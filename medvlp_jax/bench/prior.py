"""PRIOR's loss set: our jitted, vectorised JAX against the released code's loop form in
PyTorch, same sizes, same inputs, one process.

`python -m medvlp_jax.bench prior [--config=configs/prior.py[:paper]] [--set a.b=v ...]`
takes the sizes of the config's last stage (reconstruction: every loss term on): batch B,
width E, regions N (from the image size), tokens T, `max_sentences` S, prototypes K, slots Q.
It draws one set of random loss inputs (local and global image features, projected token
features with ragged sentence indices, 1..S sentences per report including one-sentence
reports, slots, a reconstructed and a target image) and PRIOR's head parameters from the
model's own init, and times forward + backward of the weighted loss set:

  jax    `jax.jit(jax.value_and_grad(...))` over the heads and the inputs through the
         library's code: `sentence_means`, `head_features` (bank, local cross-attention,
         predictor, report pool) and `Prior.loss_from_features` (the eight terms, Hungarian
         matching in a host callback);
  torch  `medvlp_jax.bench._prior_torch.prior_losses`: Python loops over reports and
         sentences, one scipy matching per report, autograd (eager).

Both use the same Gumbel noise, so they compute the same loss (printed, with each term).
Unless `--no-model-step`, the whole jitted train step of that stage (towers and decoders,
random weights, AdamW) is timed too, for context. Rounds alternate the kinds after one
warm-up round (JAX compiles there); times are medians. Prints a table (and writes the JSON
with `--out`). The CPU may be shared with other jobs: compare the ratio from one run.

Torch runs with one intra-op thread by default (`--torch-threads`, 0 = torch's default), its
fastest setting for these loops of small ops where we measured: on a loaded 2-core machine,
0.44 s a step with one thread against 42 s with two at the default sizes, 16 s against 138 s at
the paper's (threads waiting on each other at every op). JAX keeps its defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from medvlp_jax import config as config_lib

# Differentiated loss inputs (the heads are differentiated too).
INPUTS = ("local", "global_image", "tokens", "slots", "recon")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medvlp_jax.bench prior", description=__doc__)
    p.add_argument("--config", default="configs/prior.py", help="configs/prior.py[:preset]")
    p.add_argument("--set", action="append", default=[], help="override a.b=value")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model-step",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the whole model's jitted train step",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default); see the module docstring",
    )
    p.add_argument("--out", default="", help="also write the JSON here")
    return p.parse_args(argv)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else lscpu, else `platform`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def last_stage(path: str, overrides: list[str]):
    """The config's last stage (the one with every loss term): a `stages.Stage`."""
    from medvlp_jax import stages

    config = config_lib.apply_overrides(config_lib.load_config_file(path), overrides)
    last = stages.resolve(config)[-1]
    m = last.config.model
    if not (m.prototypes and m.reconstruction):
        raise SystemExit(f"{path}: the last stage has model.prototypes/reconstruction off")
    if m.matching_includes_padding or m.faithful_matching_index:
        raise SystemExit(
            "the loop form computes our default matching; drop matching_includes_padding and "
            "faithful_matching_index (the ':original' preset)"
        )
    return last


def sizes(config) -> dict:
    from medvlp_jax.methods.prior.method import image_grid

    m, d = config.model, config.data
    grid = image_grid(m.image, d.image_size)
    return {
        "batch": d.batch_size,
        "embed_dim": m.embed_dim,
        "image_size": d.image_size,
        "channels": d.channels,
        "regions": grid[0] * grid[1],
        "tokens": d.max_text_len,
        "max_sentences": m.max_sentences,
        "prototypes": m.num_prototypes,
        "slots": m.num_queries,
    }


def make_inputs(sz: dict, seed: int) -> tuple[dict, dict]:
    """(float32 inputs {INPUTS..., 'image'}, token structure {'sentence_ids' [B, T] int32,
    'attention_mask' [B, T] int32, 'counts' [B]}): report b has counts[b] in 1..S sentences
    of contiguous tokens between [CLS] and [SEP]; report 0 has one sentence, report 1 S."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, e, t, s = sz["batch"], sz["embed_dim"], sz["tokens"], sz["max_sentences"]
    if t < s + 2:
        raise SystemExit(f"data.max_text_len={t} < max_sentences + 2 = {s + 2}")
    counts = rng.integers(1, s + 1, b)
    counts[: min(b, 2)] = (1, s)[: min(b, 2)]
    ids = np.full((b, t), -1, np.int32)
    attention = np.zeros((b, t), np.int32)
    for i, n in enumerate(counts):
        length = int(rng.integers(n + 2, t + 1))  # with [CLS] and [SEP]
        cuts = np.sort(rng.choice(np.arange(2, length - 1), n - 1, replace=False))
        ids[i, 1 : length - 1] = np.searchsorted(cuts, np.arange(1, length - 1), side="right")
        attention[i, :length] = 1
    shape = (b, sz["image_size"], sz["image_size"], sz["channels"])
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    inputs = {
        "local": normal(b, sz["regions"], e),
        "global_image": normal(b, e),
        "tokens": normal(b, t, e),
        "slots": normal(b, sz["slots"], e),
        "recon": normal(*shape),
        "image": normal(*shape),
    }
    return inputs, {"sentence_ids": ids, "attention_mask": attention, "counts": counts}


def jax_side(config, inputs: dict, structure: dict, seed: int):
    """(run() -> (loss, terms, gradients of INPUTS), head params, Gumbel noise
    {'sentences', 'slots'} the run draws): forward + backward of our loss set, jitted."""
    import jax
    import jax.numpy as jnp

    from medvlp_jax.methods.base import get_method
    from medvlp_jax.methods.prior.method import TERMS, head_features
    from medvlp_jax.methods.prior.model import sentence_means
    from medvlp_jax.parallel.sharding import strip_boxes

    method = get_method(config)
    model, num = method.model, config.model.max_sentences
    rng = jax.random.PRNGKey(seed)
    bank_rng, recon_rng = jax.random.split(rng)
    consts = {"image": inputs["image"], "sentence_ids": structure["sentence_ids"]}
    consts = {k: jnp.asarray(v) for k, v in consts.items()}

    def heads(module, x, consts):
        raw, mask = sentence_means(x["tokens"], consts["sentence_ids"], num)
        return head_features(module, x["local"], x["global_image"], raw, mask, bank_rng)

    def loss(params, x, consts):
        f = model.apply({"params": params}, x, consts, method=heads)
        f |= {"slots": x["slots"], "recon": x["recon"]}
        total, metrics = method.loss_from_features({"params": params}, consts, f, recon_rng)
        return total, {name: metrics[key] for name, key in TERMS.items()}

    x = {k: jnp.asarray(inputs[k]) for k in INPUTS}
    init = jax.jit(lambda x, consts: model.init(rng, x, consts, method=heads))
    params = strip_boxes(init(x, consts))["params"]
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    def run():
        (total, terms), (_, grads) = jax.block_until_ready(step(params, x, consts))
        return total, terms, grads

    k, b = config.model.num_prototypes, inputs["local"].shape[0]
    noise = {
        "sentences": jax.random.gumbel(bank_rng, (b, num, k), jnp.float32),
        "slots": jax.random.gumbel(recon_rng, (b, config.model.num_queries, k), jnp.float32),
    }
    return run, params, noise


def torch_side(config, inputs: dict, structure: dict, params, noise: dict):
    """run() -> (loss, terms, gradients of INPUTS): forward + backward of
    `_prior_torch.prior_losses`."""
    import jax
    import numpy as np
    import torch

    from medvlp_jax.bench import _prior_torch as prior_torch
    from medvlp_jax.methods.prior.method import MAX_SCALE, TERMS

    m = config.model
    heads = prior_torch.torch_heads(jax.tree.map(np.asarray, params))
    x = {k: torch.tensor(inputs[k], requires_grad=True) for k in INPUTS}
    x["image"] = torch.tensor(inputs["image"])
    noise = {k: torch.tensor(np.asarray(v)) for k, v in noise.items()}
    kw = dict(
        tau=m.gumbel_tau,
        weights={name: m[f"{name}_weight"] for name in TERMS},
        max_scale=MAX_SCALE if m.clamp_logit_scale else None,
    )
    leaves = [*heads.values(), *(x[k] for k in INPUTS)]
    ids, counts = structure["sentence_ids"], structure["counts"].tolist()

    def run():
        for leaf in leaves:
            leaf.grad = None
        total, terms = prior_torch.prior_losses(x, ids, counts, heads, noise, **kw)
        total.backward()
        grads = {k: x[k].grad for k in INPUTS}
        return total.detach(), {k: v.detach() for k, v in terms.items()}, grads

    return run


def model_step_side(config, inputs: dict, structure: dict, seed: int):
    """run(): one jitted train step of the whole model (random weights) on a batch of the
    same images and sentence structure with random token ids."""
    import flax.linen as nn
    import jax
    import numpy as np

    from medvlp_jax import train
    from medvlp_jax.methods.base import SetupContext, get_method
    from medvlp_jax.parallel import mesh as mesh_lib
    from medvlp_jax.parallel.sharding import ACTIVATION_RULES

    config = config_lib.apply_overrides(config, [f"init.{k}.source=" for k in config.init])
    attention = structure["attention_mask"]
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, config.model.text.vocab_size, attention.shape).astype(np.int32)
    ids[:, 0] = 101  # [CLS]
    ids[np.arange(len(ids)), attention.sum(1) - 1] = 102  # [SEP]
    local = {
        "image": inputs["image"],
        "input_ids": np.where(attention == 1, ids, 0).astype(np.int32),
        "attention_mask": attention,
        "sentence_ids": structure["sentence_ids"],
    }
    mesh = mesh_lib.make_mesh(config.mesh)
    method = get_method(config)
    method.setup(SetupContext(config, Path(tempfile.mkdtemp()), mesh, None, []))
    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        batch = mesh_lib.global_batch(mesh, local)
        state, shardings, tx, lr_fn, trainable = train.create_state(config, method, mesh, batch)
        step = train.jit_step(method, tx, lr_fn, trainable, shardings, batch, config.optim)
    holder = [state]

    def run():
        with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
            holder[0], metrics = step(holder[0], batch)
            jax.block_until_ready((holder[0], metrics))
        return metrics["loss"]

    return run


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _rel_diff(a, b) -> float:
    """max |a - b| / max |b| (b: a torch tensor)."""
    import numpy as np

    b = b.numpy()
    return float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-30))


def table(result: dict) -> str:
    """The human-readable summary of `result`."""
    sz, c = result["sizes"], result["counts"]
    lines = [
        f"PRIOR loss set, {result['stage']} stage, forward + backward ({result['config']})",
        f"sizes: B={sz['batch']} E={sz['embed_dim']} N={sz['regions']} regions "
        f"({sz['image_size']} px) T={sz['tokens']} S={sz['max_sentences']} "
        f"({c['min']}-{c['max']} sentences per report, mean {c['mean']}, "
        f"{c['one_sentence']} with one) K={sz['prototypes']} Q={sz['slots']}",
        f"CPU: {result['cpu']} ({result['cpus']} cores, load {result['load_average_1min']}; "
        f"torch threads {result['torch_threads']})",
        f"{'':34}{'median s':>10}  all",
    ]
    rows = [
        ("jax, jitted, vectorised", "jax_loss_s"),
        ("torch, eager, per-report loops", "torch_loss_s"),
        ("jax train step, whole model", "model_step_s"),
    ]
    for label, key in rows:
        if key in result:
            lines.append(f"{label:34}{result[key]:>10.4f}  {result[key + '_all']}")
    lines.append(f"{'ratio jax / torch (loss set)':34}{result['ratio_jax_over_torch']:>10.3f}")
    lines.append(
        f"same loss: jax {result['loss_jax']:.6g}, torch {result['loss_torch']:.6g} "
        f"(relative difference {result['loss_rel_diff']:.1e}, input gradients "
        f"{result['grad_rel_diff']:.1e}); "
        f"jax compile {result['jax_compile_s']} s"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    import jax
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    stage = last_stage(args.config, args.set)
    config = stage.config
    sz = sizes(config)
    inputs, structure = make_inputs(sz, args.seed)
    jax_run, params, noise = jax_side(config, inputs, structure, args.seed)
    runs = {"jax_loss": jax_run, "torch_loss": torch_side(config, inputs, structure, params, noise)}
    if args.model_step:
        runs["model_step"] = model_step_side(config, inputs, structure, args.seed)
    times: dict[str, list[float]] = {k: [] for k in runs}
    first, outputs = {}, {}
    for i in range(1 + args.repeats):  # round 0 warms up (JAX compiles)
        for name, fn in runs.items():
            t, outputs[name] = _timed(fn)
            if i:
                times[name].append(t)
            else:
                first[name] = t

    (loss_jax, terms_jax, grads_jax), (loss_torch, terms_torch, grads_torch) = (
        outputs["jax_loss"],
        outputs["torch_loss"],
    )
    counts = structure["counts"]
    result = {
        "bench": "prior",
        "config": args.config,
        "overrides": args.set,
        "stage": stage.name,
        "sizes": sz,
        "counts": {
            "min": int(counts.min()),
            "max": int(counts.max()),
            "mean": round(float(counts.mean()), 2),
            "one_sentence": int((counts == 1).sum()),
        },
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "repeats": args.repeats,
        "jax_compile_s": round(first["jax_loss"], 2),
    }
    for name, ts in times.items():
        result[f"{name}_s"] = round(statistics.median(ts), 5)
        result[f"{name}_s_all"] = [round(t, 5) for t in ts]
    result["ratio_jax_over_torch"] = round(result["jax_loss_s"] / result["torch_loss_s"], 4)
    result["loss_jax"], result["loss_torch"] = float(loss_jax), float(loss_torch)
    result["loss_rel_diff"] = abs(result["loss_jax"] - result["loss_torch"]) / max(
        abs(result["loss_torch"]), 1e-12
    )
    result["grad_rel_diff"] = max(_rel_diff(grads_jax[k], grads_torch[k]) for k in INPUTS)
    result["terms_jax"] = {k: float(v) for k, v in terms_jax.items()}
    result["terms_torch"] = {k: float(v) for k, v in terms_torch.items()}
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result
