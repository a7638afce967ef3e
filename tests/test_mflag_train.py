"""M-FLAG end to end: the main command on configs/mflag.py:tiny trains, evaluates and resumes;
the frozen language model stays bit-identical with no optimizer state; the [CLS] cache is
computed once and reused (also when the weights come from an `init.checkpoint` load)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medvlp_jax import batch_stats, train
from medvlp_jax import config as config_lib
from medvlp_jax.data import pipeline, sources, tokenize
from medvlp_jax.methods.base import SetupContext, get_method
from medvlp_jax.methods.mflag import MFlagModel
from medvlp_jax.parallel import mesh as mesh_lib
from medvlp_jax.parallel.sharding import ACTIVATION_RULES

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
    assert "text embedding cache miss" in first.stdout
    # The method's row freezes the LM; the trainer writes the table with its totals.
    table = (work / "parameters.txt").read_text()
    assert "text/.* -> frozen" in table and "trainable " in table
    # the preset's 10 steps, then batch-norm statistics are refreshed and the evaluators run
    second = _main(work, cache, "train.refresh_batch_stats=2")
    assert "resuming from step 5" in second.stdout
    assert "text embedding cache hit" in second.stdout and "cache miss" not in second.stdout
    assert "refreshed batch-norm statistics on 2 batches" in second.stdout

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
        config, [f"init.checkpoint.source={work}", f"model.text_cache_dir={cache}"]
    )
    method = get_method(warm)
    tok = tokenize.load_tokenizer(warm.data.tokenizer)
    records = sources.load_records(warm.data, "train")
    mesh = mesh_lib.make_mesh(warm.mesh)
    method.setup(SetupContext(warm, tmp_path, mesh, tok, records))
    assert method.cache_hit
    # ... and the whole start state: weights and the projectors' batch-norm statistics.
    example = next(pipeline.train_iterator(warm.data, records, tok, seed=0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        state, *_ = train.create_state(warm, method, mesh, mesh_lib.global_batch(mesh, example))
    for name in ("params", "model_state"):
        saved, loaded = at10[name], getattr(state, name)
        for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(loaded), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
    assert jax.tree.leaves(state.model_state)  # the projectors' BNs: there are statistics


def test_batch_stats_refresh_brings_eval_mode_to_train_mode_and_touches_nothing_else():
    """Stale running statistics (shifted and scaled) make eval-mode projections far from the
    train-mode ones; a refresh at fixed weights brings them together, changes only
    `model_state`, and is repeatable (each refresh starts a fresh fixed-seed iterator)."""
    config = config_lib.apply_overrides(
        config_lib.load_config_file(str(ROOT / "configs/mflag.py:tiny")),
        ["model.text_dropout_in_frozen_lm=true"],
    )
    mesh = mesh_lib.make_mesh(config.mesh)
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    records = sources.load_records(config.data, "train")
    method = get_method(config)
    method.setup(SetupContext(config, Path("/nonexistent"), mesh, tokenizer, records))
    make_iterator = lambda: pipeline.train_iterator(config.data, records, tokenizer, seed=1)
    it = make_iterator()
    images = np.concatenate([next(it)["image"] for _ in range(4)])  # 64 training images

    def projections(variables, train_mode):
        model_vars = {**variables, "params": dict(variables["params"])}
        model_vars["params"].pop("text")
        fn = lambda m, x: m.proj_v(m.image_features(x, train=train_mode), train=train_mode)
        mutable = ["batch_stats"] if train_mode else False
        out = MFlagModel.apply(method.model, model_vars, images, method=fn, mutable=mutable)
        return np.asarray(out[0] if train_mode else out)

    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        example = mesh_lib.global_batch(mesh, next(it))
        state, *_ = train.create_state(config, method, mesh, example)
        refresher = batch_stats.BatchStatsRefresher(
            jax.jit(batch_stats.make_refresh_step(method)), make_iterator, 200, mesh
        )
        # From the init statistics (0, 1) to the real ones, then spoiled relative to them.
        # 200 batches: the tiny random tower's feature variances are ~1e-7, and a refresh
        # keeps 0.9^K of the old statistics (2e-3 of them after 60 batches).
        state = refresher(state)
        stale = {
            "batch_stats": jax.tree.map(
                lambda stats: {
                    "mean": stats["mean"] + 3.0 * jnp.sqrt(stats["var"]),
                    "var": 5.0 * stats["var"],
                },
                state.model_state["batch_stats"],
                is_leaf=lambda x: isinstance(x, dict) and "var" in x,
            )
        }
        state = state.replace(model_state=stale)
        refreshed = refresher(state)
        again = refresher(state)

    target = projections(state.variables(), train_mode=True)
    error = lambda v: np.linalg.norm(projections(v, False) - target) / np.linalg.norm(target)
    assert error(state.variables()) > 0.5
    assert error(refreshed.variables()) < 0.2
    for a, b in zip(jax.tree.leaves(refreshed.model_state), jax.tree.leaves(stale), strict=True):
        assert not np.allclose(a, b)
    for name in ("step", "params", "opt_state", "rng"):
        for a, b in zip(
            jax.tree.leaves(getattr(refreshed, name)),
            jax.tree.leaves(getattr(state, name)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(refreshed), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def _flat(config) -> dict:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = value
    return out


def test_original_preset_sets_exactly_the_documented_fields():
    spec = str(ROOT / "configs/mflag.py")
    module_spec = importlib.util.spec_from_file_location("mflag_config", spec)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    linked = {"model.image.bn_stats", "model.image.bn_unbiased_running_var"}
    for preset, extra in (("", set()), ("tiny", {"model.text.max_len"})):
        base = _flat(config_lib.load_config_file(f"{spec}:{preset}"))
        original = config_lib.load_config_file(f"{spec}:{preset},original")
        config_lib.check_choices(original)
        flat = _flat(original)
        changed = {k for k in flat if flat[k] != base[k]}
        assert changed == set(module.ORIGINAL) | linked | {"optim.restart_period"} | extra
        assert all(flat[k] == v for k, v in module.ORIGINAL.items())
        assert flat["optim.restart_period"] == flat["train.num_steps"] // 5
        assert base["model.image.bn_stats"] == "global"
    with pytest.raises(ValueError, match=r"configs/mflag\.py"):
        config_lib.load_config_file(spec + ":tiny,scratch")


def test_original_preset_trains_end_to_end(tmp_path):
    """`configs/mflag.py:tiny,original` on the 8 simulated devices (2 rows each): per-device
    batch norm and orthogonality, 512-token impression + findings, two steps and a resume."""
    config = config_lib.apply_overrides(
        config_lib.load_config_file(str(ROOT / "configs/mflag.py:tiny,original")),
        [
            "train.num_steps=2",
            "train.log_every=1",
            "train.checkpoint_every=1",
            "train.eval_every=2",
            f"model.text_cache_dir={tmp_path / 'text_cache'}",
            *(f"evals.{e}.enabled=false" for e in ("zero_shot", "retrieval", "linear_probe")),
        ],
    )
    assert mesh_lib.make_mesh(config.mesh).devices.size == 8
    train.run(config, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m for m in lines if "train/loss" in m}
    assert sorted(losses) == [1, 2] and all(np.isfinite(m["train/loss"]) for m in losses.values())
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    # `impression += findings`: the findings start right after the impression's full stop.
    joined = re.compile(r"\.[A-Z]")
    assert any(joined.search(r.text) for r in sources.load_records(config.data, "train"))
