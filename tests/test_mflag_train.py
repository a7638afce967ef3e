"""M-FLAG end to end: the main command on configs/mflag.py:tiny trains, evaluates and resumes;
the frozen language model stays bit-identical with no optimizer state; the [CLS] cache is
computed once and reused (also when the weights come from `init.checkpoint`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from medvlp_jax import config as config_lib
from medvlp_jax.data import sources, tokenize
from medvlp_jax.methods.base import SetupContext, get_method
from medvlp_jax.parallel import mesh as mesh_lib

ROOT = Path(__file__).resolve().parents[1]


def _main(workdir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        # The second run reuses the first one's compiled programs.
        "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    cmd = [
        sys.executable,
        "-m",
        "medvlp_jax.main",
        "--config=configs/mflag.py:tiny",
        f"--workdir={workdir}",
        f"--config.model.text_cache_dir={cache}",
        *(f"--config.{o}" for o in overrides),
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _state(workdir: Path, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def test_main_trains_resumes_and_keeps_the_language_model_frozen(tmp_path):
    work, cache = tmp_path / "run", tmp_path / "text_cache"
    no_eval = [f"evals.{e}.enabled=false" for e in ("zero_shot", "retrieval", "linear_probe")]
    first = _main(work, cache, "train.num_steps=5", *no_eval)
    assert "text embedding cache miss" in first.stderr
    assert "fewer trainable parameters than a dual encoder" in first.stderr
    second = _main(work, cache)  # the preset's 10 steps, then the evaluators
    assert "resuming from step 5" in second.stdout
    assert "text embedding cache hit" in second.stderr and "cache miss" not in second.stderr

    lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in lines if m["step"] == 10 and "eval/synthcxr/zero_shot_acc" in m]
    assert final and "eval/synthcxr/linear_probe_auroc@1" in final[0]
    assert all(np.isfinite(m["train/loss"]) for m in lines if "train/loss" in m)

    # The frozen LM: bit-identical to its initial weights after 5 and 10 steps, no optimizer
    # state; the trained parts moved.
    config = config_lib.load_config_file(str(ROOT / "configs/mflag.py:tiny"))
    initial = get_method(config)._frozen_text_params()
    at5, at10 = _state(work, 5), _state(work, 10)
    for a, b, c in zip(
        jax.tree.leaves(initial),
        jax.tree.leaves(at5["params"]["text"]),
        jax.tree.leaves(at10["params"]["text"]),
        strict=True,
    ):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    kernel = lambda s: s["params"]["proj_v"]["fc0"]["kernel"]
    assert not np.array_equal(kernel(at5), kernel(at10))
    opt_paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(at10["opt_state"])[0]
    ]
    assert any("proj_v" in p for p in opt_paths)
    assert not any("text" in p for p in opt_paths)

    # Warm-starting from this run: the LM weights are read from its checkpoint; same entry.
    warm = config_lib.apply_overrides(
        config, [f"init.checkpoint={work}", f"model.text_cache_dir={cache}"]
    )
    method = get_method(warm)
    tok = tokenize.load_tokenizer(warm.data.tokenizer)
    records = sources.load_records(warm.data, "train")
    method.setup(SetupContext(warm, tmp_path, mesh_lib.make_mesh(warm.mesh), tok, records))
    assert method.cache_hit
