"""Two-tower contrastive train step: our JAX code vs PyTorch eager, same sizes, one process.

`python -m medvlp_jax.bench step [--batch 32 ...]` builds a ViT image tower and a BERT text
tower (both `--layers` x `--width`, dropout off), projection heads, a learnable temperature and
the symmetric InfoNCE loss, and times one AdamW step in JAX (jitted, buffers donated) and in
PyTorch (transformers' ViTModel/BertModel + torch.optim.AdamW, eager), alternating, after
warm-up. Also measures the fp32 matmul peak of both libraries in the same run and prints one
JSON object: median step seconds, ratio jax/torch, achieved GFLOP/s (analytic matmul FLOPs of
forward + backward) and fractions of the measured peak. Everything is fp32 unless
`--jax-dtype bfloat16` (then compare with care: torch stays fp32).

The CPU may be shared with other jobs: compare ratios from one run (paired, alternating), not
absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medvlp_jax.bench step", description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vision-heads", type=int, default=6)
    p.add_argument("--text-heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--jax-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--fused-qkv", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--xla-flags",
        default="",
        help="extra XLA_FLAGS for this process (applied before jax is imported)",
    )
    p.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="XLA debug option for compiling the JAX step only, e.g. xla_cpu_use_xnnpack=false",
    )
    p.add_argument("--skip-torch", action="store_true", help="time only the JAX step")
    p.add_argument("--out", default="", help="also write the JSON here")
    return p.parse_args(argv)


def xla_options(items: list[str]) -> dict[str, str | bool | int]:
    """['name=value', ...] -> compiler_options for `Lowered.compile` (bools/ints converted)."""
    out: dict[str, str | bool | int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--xla-option {item!r}: expected NAME=VALUE")
        if value.lower() in ("true", "false"):
            out[name] = value.lower() == "true"
        else:
            out[name] = int(value) if value.lstrip("-").isdigit() else value
    return out


def matmul_flops(a: argparse.Namespace) -> dict[str, float]:
    """Analytic matmul FLOPs of one train step (backward = 2 x forward) per tower."""

    def layers(tokens: int, heads: int) -> float:
        d, m, b = a.width, 4 * a.width, a.batch
        dense = 2 * b * tokens * (4 * d * d + 2 * d * m)
        attention = 2 * 2 * b * tokens * tokens * d  # QK^T and PV over all heads
        return a.layers * (dense + attention)

    patches = (a.image_size // a.patch) ** 2
    vision = layers(patches + 1, a.vision_heads)
    vision += 2 * a.batch * patches * a.patch * a.patch * 3 * a.width
    text = layers(a.text_len, a.text_heads)
    heads = 2 * 2 * a.batch * a.width * a.embed_dim + 2 * 2 * a.batch * a.batch * a.embed_dim
    return {"vision": 3 * vision, "text": 3 * text, "heads_and_loss": 3 * heads}


def _inputs(a: argparse.Namespace, seed: int = 0):
    import numpy as np

    rng = np.random.RandomState(seed)
    images = rng.randn(a.batch, a.image_size, a.image_size, 3).astype(np.float32)
    ids = rng.randint(1000, a.vocab, (a.batch, a.text_len)).astype(np.int32)
    ids[:, 0] = 101
    mask = np.ones((a.batch, a.text_len), np.int32)
    mask[::2, a.text_len // 2 :] = 0  # half the batch padded to half length
    return images, ids, mask


# ---------------------------------------------------------------------------------------- JAX


def jax_step(a: argparse.Namespace):
    """(step_fn, state) for the JAX model; step_fn(state) -> (state, loss)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from medvlp_jax.models import BertEncoder, TransformerConfig, VisionTransformer
    from medvlp_jax.models.testing import random_variables

    dtype = jnp.bfloat16 if a.jax_dtype == "bfloat16" else jnp.float32
    common = dict(width=a.width, num_layers=a.layers, mlp_dim=4 * a.width, dtype=dtype)
    common["fused_qkv"] = a.fused_qkv
    vision_t = TransformerConfig(num_heads=a.vision_heads, layer_norm_eps=1e-12, **common)
    text_t = TransformerConfig(
        num_heads=a.text_heads, norm_first=False, layer_norm_eps=1e-12, **common
    )

    class TwoTower(nn.Module):
        @nn.compact
        def __call__(self, images, ids, mask):
            img = VisionTransformer(
                vision_t, a.image_size, a.patch, layout="hf", pooler=False, name="image"
            )(images)["pooled"]
            txt = BertEncoder(text_t, a.vocab, a.text_len, pooler=False, name="text")(ids, mask)
            zi = nn.Dense(a.embed_dim, name="img_proj", dtype=dtype)(img).astype(jnp.float32)
            zt = nn.Dense(a.embed_dim, name="txt_proj", dtype=dtype)(txt["pooled"])
            zt = zt.astype(jnp.float32)
            scale = self.param("logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), ())
            zi = zi / jnp.linalg.norm(zi, axis=-1, keepdims=True)
            zt = zt / jnp.linalg.norm(zt, axis=-1, keepdims=True)
            logits = jnp.exp(scale) * zi @ zt.T
            labels = jnp.arange(logits.shape[0])
            ce = optax.softmax_cross_entropy_with_integer_labels
            return (ce(logits, labels).mean() + ce(logits.T, labels).mean()) / 2

    model = TwoTower()
    images, ids, mask = _inputs(a)
    params = random_variables(model, images, ids, mask)["params"]
    tx = optax.adamw(1e-4, weight_decay=0.05)
    opt_state = tx.init(params)
    batch = tuple(jnp.asarray(x) for x in (images, ids, mask))

    def update(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: model.apply({"params": p}, *batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = [jax.device_put(params), jax.device_put(opt_state)]
    lowered = jax.jit(update, donate_argnums=(0, 1)).lower(state[0], state[1], batch)
    step = lowered.compile(compiler_options=xla_options(a.xla_option))

    def run():
        state[0], state[1], loss = step(state[0], state[1], batch)
        return float(loss)

    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return run, float(cost.get("flops", 0.0)) if cost else 0.0


# -------------------------------------------------------------------------------------- torch


def torch_step(a: argparse.Namespace):
    """step_fn() -> loss for the PyTorch reference (transformers towers, AdamW, eager)."""
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(
        hidden_size=a.width,
        num_hidden_layers=a.layers,
        intermediate_size=4 * a.width,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            num_attention_heads=a.vision_heads,
            image_size=a.image_size,
            patch_size=a.patch,
            **common,
        ),
        add_pooling_layer=False,
    )
    bert = transformers.BertModel(
        transformers.BertConfig(
            num_attention_heads=a.text_heads,
            vocab_size=a.vocab,
            max_position_embeddings=a.text_len,
            **common,
        ),
        add_pooling_layer=False,
    )
    img_proj = torch.nn.Linear(a.width, a.embed_dim)
    txt_proj = torch.nn.Linear(a.width, a.embed_dim)
    logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
    modules = torch.nn.ModuleList([vit, bert, img_proj, txt_proj]).train()
    params = [*list(modules.parameters()), logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    images, ids, mask = _inputs(a)
    pixels = torch.tensor(images).permute(0, 3, 1, 2).contiguous()
    ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    labels = torch.arange(a.batch)
    ce = torch.nn.functional.cross_entropy
    norm = torch.nn.functional.normalize

    def run():
        opt.zero_grad(set_to_none=True)
        zi = norm(img_proj(vit(pixel_values=pixels).last_hidden_state[:, 0]), dim=-1)
        zt = norm(
            txt_proj(bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]), dim=-1
        )
        logits = logit_scale.exp() * zi @ zt.T
        loss = (ce(logits, labels) + ce(logits.T, labels)) / 2
        loss.backward()
        opt.step()
        return loss.item()

    return run


# ------------------------------------------------------------------------------------- timing


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """fp32 n x n matmul GFLOP/s of JAX and PyTorch (best of `repeats`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = np.random.RandomState(0).randn(n, n).astype(np.float32)
    out = {}
    f = jax.jit(lambda a, b: a @ b)
    xa = jnp.asarray(x)
    f(xa, xa).block_until_ready()
    out["jax"] = _best(lambda: f(xa, xa).block_until_ready(), repeats)
    try:
        import torch
    except ImportError:
        return {k: 2 * n**3 / t / 1e9 for k, t in out.items()}
    xt = torch.tensor(x)
    xt @ xt
    out["torch"] = _best(lambda: xt @ xt, repeats)
    return {k: 2 * n**3 / t / 1e9 for k, t in out.items()}


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    a = parse_args(argv)
    if a.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + a.xla_flags).strip()
    import jax

    jax_run, xla_flops = jax_step(a)
    torch_run = None if a.skip_torch else torch_step(a)
    runs = {"jax": jax_run} | ({"torch": torch_run} if torch_run else {})
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(a.warmup + a.repeats):
        for name, fn in runs.items():
            t = _timed(fn)
            if i >= a.warmup:
                times[name].append(t)
    peak = matmul_peak(a.peak_size)
    flops = matmul_flops(a)
    total = sum(flops.values())
    machine_peak = max(peak.values())
    result = {
        "config": {k: v for k, v in vars(a).items() if k not in ("out",)},
        "jax_version": jax.__version__,
        "devices": str(jax.devices()[0].device_kind),
        "analytic_matmul_gflop_per_step": float(f"{total / 1e9:.5g}"),
        "xla_cost_analysis_gflop_per_step": float(f"{xla_flops / 1e9:.5g}"),
        "matmul_peak_gflops_fp32": {k: round(v, 1) for k, v in peak.items()},
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        result[f"{name}_step_s"] = round(med, 4)
        result[f"{name}_step_s_all"] = [round(t, 4) for t in ts]
        result[f"{name}_gflops"] = round(total / med / 1e9, 1)
        result[f"{name}_fraction_of_machine_peak"] = round(total / med / 1e9 / machine_peak, 3)
    if "torch" in times:
        result["ratio_jax_over_torch"] = round(result["jax_step_s"] / result["torch_step_s"], 3)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
