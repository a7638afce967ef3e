"""M-FLAG's total loss against an independent float64 numpy re-derivation (projectors with
train-mode batch norm, alignment, orthogonality): value, batch statistics and gradient, on
random inputs; per-device orthogonality on 8 devices; the `:original` preset (per-device batch
norm and orthogonality, PyTorch's running variance) on 2 and 8 devices against the released
computation re-derived per device; the frozen LM's [CLS] path."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax import config as config_lib
from medvlp_jax import optim
from medvlp_jax.methods.base import SetupContext, get_method
from medvlp_jax.methods.mflag import MFlagModel
from medvlp_jax.models.builders import build_image_tower, build_text_tower
from medvlp_jax.parallel.mesh import MESH_AXES
from medvlp_jax.parallel.sharding import strip_boxes

ROOT = Path(__file__).resolve().parents[1]
B, DZ, DT = 16, 12, 10


def tiny_mflag(*overrides: str):
    config = config_lib.load_config_file(str(ROOT / "configs/mflag.py:tiny"))
    return config_lib.apply_overrides(
        config, ["model.proj_hidden=16", "model.proj_dim=8", *overrides]
    )


# --- the numpy reference -------------------------------------------------------------------


def np_batch_norm(x, scale=None, bias=None, eps=1e-5):
    mean, var = x.mean(0), x.var(0)  # biased variance, as in training-mode batch norm
    y = (x - mean) / np.sqrt(var + eps)
    if scale is not None:
        y = y * scale + bias
    return y, mean, var


def np_head(x, p):
    """Linear -> BN -> ReLU -> Linear -> BN(no affine). Returns (out, {bn: (mean, var)})."""
    h = x @ p["fc0"]["kernel"] + p["fc0"]["bias"]
    h, m0, v0 = np_batch_norm(h, p["bn0"]["scale"], p["bn0"]["bias"])
    out = np.maximum(h, 0) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    out, m1, v1 = np_batch_norm(out)
    return out, {"bn0": (m0, v0), "bn_final": (m1, v1)}


def np_orth(z, lam, normalize):
    if normalize:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    c = z.T @ z / len(z)
    off = c - np.diag(np.diag(c))
    return 0.5 * (np.sum((np.diag(c) - 1) ** 2) + lam * np.sum(off**2))


def np_released_total(inputs, shards):
    """The released code's loss on `shards` GPUs (DDP without SyncBatchNorm): each GPU runs
    both projectors with its own batch statistics and its own orthogonality on its rows; the
    gradient of the mean of the GPUs' losses is DDP's averaged gradient. -> (loss, align,
    orth, running-statistics targets of GPU 0: biased mean, unbiased variance)."""
    chunks = [
        {**inputs, "z": z, "t": t}
        for z, t in zip(np.split(inputs["z"], shards), np.split(inputs["t"], shards), strict=True)
    ]
    parts = [np_total(c) for c in chunks]
    loss, align, orth = (np.mean([p[i] for p in parts]) for i in range(3))
    n = len(chunks[0]["z"])
    stats = jax.tree.map(
        lambda mv: (mv[0], mv[1] * n / (n - 1)), parts[0][3], is_leaf=lambda x: type(x) is tuple
    )
    return loss, align, orth, stats


def np_total(inputs, lam=0.0051, normalize=False, orth_chunks=1, orth_weight=1.0):
    """inputs = {'z', 't', 'proj_v', 'proj_t'} -> (loss, align, orth, stats)."""
    p, stats_v = np_head(inputs["z"], inputs["proj_v"])
    q, stats_t = np_head(inputs["t"], inputs["proj_t"])
    cos = np.sum(p * q, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(q, axis=1))
    align = np.mean(4 - 4 * cos)
    orth = np.mean([np_orth(c, lam, normalize) for c in np.split(inputs["z"], orth_chunks)])
    return align + orth_weight * orth, align, orth, {"proj_v": stats_v, "proj_t": stats_t}


# --- helpers -------------------------------------------------------------------------------


def random_inputs(method, seed=0):
    """Random Z (non-negative, as post-ReLU), t_cls and randomised projector parameters."""
    rng = np.random.default_rng(seed)
    z = np.abs(rng.normal(size=(B, DZ))).astype(np.float32)
    t = rng.normal(size=(B, DT)).astype(np.float32)
    variables = strip_boxes(
        method.model.init(jax.random.PRNGKey(seed), z, t, method=MFlagModel.project)
    )
    params = jax.tree.map(
        lambda x: (np.asarray(x) + 0.3 * rng.normal(size=x.shape)).astype(np.float32),
        variables["params"],
    )
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    return {"z": z, "t": t, **params}, stats


def jax_total(method, inputs, stats):
    variables = {
        "params": {"proj_v": inputs["proj_v"], "proj_t": inputs["proj_t"], "text": {}},
        "batch_stats": stats,
    }
    return method.features_loss(variables, inputs["z"], inputs["t"], train=True)


def directional_fd(fn, inputs, direction, eps=1e-5):
    f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    x, d = f64(inputs), f64(direction)
    plus = jax.tree.map(lambda a, b: a + eps * b, x, d)
    minus = jax.tree.map(lambda a, b: a - eps * b, x, d)
    return (fn(plus) - fn(minus)) / (2 * eps)


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "normalize,lam,weight", [(False, 0.0051, 1.0), (True, 0.3, 0.25)], ids=["raw", "norm"]
)
def test_total_loss_value_stats_and_gradient_match_numpy(normalize, lam, weight):
    method = get_method(
        tiny_mflag(
            f"model.orth_normalize={normalize}",
            f"model.orth_lambda_offdiag={lam}",
            f"model.orth_weight={weight}",
        )
    )
    inputs, stats = random_inputs(method)
    fn = jax.jit(lambda x, s: jax_total(method, x, s))
    loss, metrics, new_state = fn(inputs, stats)
    want, align, orth, batch_stats = np_total(inputs, lam, normalize, orth_weight=weight)
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    np.testing.assert_allclose(metrics["align_loss"], align, rtol=2e-5)
    np.testing.assert_allclose(metrics["orth_loss"], orth, rtol=2e-5)
    assert loss.dtype == jnp.float32
    # Running averages: momentum 0.9 towards the batch mean and (biased) variance.
    for head, layers in batch_stats.items():
        for bn, (mean, var) in layers.items():
            old = stats[head][bn]
            got = new_state["batch_stats"][head][bn]
            np.testing.assert_allclose(got["mean"], 0.9 * old["mean"] + 0.1 * mean, atol=1e-5)
            np.testing.assert_allclose(got["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-4)

    grads = jax.jit(jax.grad(lambda x, s: jax_total(method, x, s)[0]))(inputs, stats)
    rng = np.random.default_rng(1)
    for _ in range(3):
        direction = jax.tree.map(lambda x: rng.normal(size=x.shape), inputs)
        expected = directional_fd(
            lambda x: np_total(x, lam, normalize, orth_weight=weight)[0], inputs, direction
        )
        got = sum(
            float(np.sum(np.asarray(g, np.float64) * d))
            for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        np.testing.assert_allclose(got, expected, rtol=2e-3)


def test_per_device_orthogonality_averages_the_shards(tmp_path):
    mesh = jax.make_mesh((8, 1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    losses = {}
    for mode in ("per_device", "global"):
        method = get_method(tiny_mflag(f"model.orth_batch={mode}"))
        method.setup(SetupContext(method.config, tmp_path, mesh, None, []))
        inputs, stats = random_inputs(method)
        losses[mode] = jax.jit(lambda x, s, m=method: jax_total(m, x, s)[:2])(inputs, stats)
    # Batch norm and alignment use the global batch; C and B are each shard's own 2 rows.
    want, _, orth, _ = np_total(inputs, orth_chunks=8)
    loss, metrics = losses["per_device"]
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    np.testing.assert_allclose(metrics["orth_loss"], orth, rtol=2e-5)
    np.testing.assert_allclose(losses["global"][0], np_total(inputs)[0], rtol=2e-5)
    assert not np.isclose(losses["global"][1]["orth_loss"], orth, rtol=1e-2)


def tiny_original(*overrides: str):
    config = config_lib.load_config_file(str(ROOT / "configs/mflag.py:tiny,original"))
    return config_lib.apply_overrides(
        config, ["model.proj_hidden=16", "model.proj_dim=8", *overrides]
    )


def _mesh(devices: int):
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(
        (devices, 1, 1), MESH_AXES, axis_types=auto, devices=jax.devices()[:devices]
    )


def _original_loss(config, mesh, tmp_path):
    """(jitted features loss, its gradient) of `config`'s method on `mesh`."""
    method = get_method(config)
    method.setup(SetupContext(method.config, tmp_path, mesh, None, []))

    def run(fn):
        jitted = jax.jit(fn)

        def under_mesh(x, s):
            with jax.set_mesh(mesh):  # the batch norms read their shard count from it
                return jitted(x, s)

        return under_mesh

    value = run(lambda x, s: jax_total(method, x, s))
    grad = run(jax.grad(lambda x, s: jax_total(method, x, s)[0]))
    return method, value, grad


@pytest.mark.parametrize("devices", [2, 8])
def test_original_loss_gradient_and_statistics_match_the_released_per_device_computation(
    devices, tmp_path
):
    """`configs/mflag.py:original` on `devices` simulated devices equals the released code on
    as many GPUs: per-device batch-norm statistics in both projectors, per-device C = Z^T Z / b,
    the mean of the devices' losses and its gradient, running statistics from device 0's
    batch with PyTorch's unbiased variance."""
    mesh = _mesh(devices)
    method, value, grad = _original_loss(tiny_original(), mesh, tmp_path)
    inputs, stats = random_inputs(method)
    loss, metrics, new_state = value(inputs, stats)
    want, align, orth, running = np_released_total(inputs, devices)
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    np.testing.assert_allclose(metrics["align_loss"], align, rtol=2e-5)
    np.testing.assert_allclose(metrics["orth_loss"], orth, rtol=2e-5)
    assert not np.isclose(loss, np_total(inputs)[0], rtol=1e-3)  # global statistics differ
    for head, layers in running.items():
        for bn, (mean, var) in layers.items():
            old, got = stats[head][bn], new_state["batch_stats"][head][bn]
            np.testing.assert_allclose(got["mean"], 0.9 * old["mean"] + 0.1 * mean, atol=1e-5)
            np.testing.assert_allclose(got["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-4)

    grads = grad(inputs, stats)
    rng = np.random.default_rng(devices)
    for _ in range(3):
        direction = jax.tree.map(lambda x: rng.normal(size=x.shape), inputs)
        expected = directional_fd(lambda x: np_released_total(x, devices)[0], inputs, direction)
        got = sum(
            float(np.sum(np.asarray(g, np.float64) * d))
            for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        np.testing.assert_allclose(got, expected, rtol=2e-3)


def test_each_original_switch_changes_only_what_it_names(tmp_path):
    """From `:original`, setting one switch back to our default changes only its own part:
    global orthogonality moves L_orth alone; global batch norm moves the alignment and the
    statistics alone; Flax's running variance moves the running variance alone."""
    mesh = _mesh(2)
    runs = {}
    for name, override in (
        ("original", ()),
        ("orth", ("model.orth_batch=global",)),
        ("bn", ("model.bn_stats=global",)),
        ("var", ("model.bn_unbiased_running_var=false",)),
    ):
        method, value, _ = _original_loss(tiny_original(*override), mesh, tmp_path)
        inputs, stats = random_inputs(method)
        _, metrics, state = value(inputs, stats)
        runs[name] = (metrics, jax.tree.map(np.asarray, state["batch_stats"]))
    (m0, s0), same, differ = runs["original"], np.testing.assert_allclose, np.isclose

    def stats_equal(a, b, key):
        return all(np.allclose(x[key], y[key]) for x, y in zip(_bns(a), _bns(b), strict=True))

    m, s = runs["orth"]
    same(m["align_loss"], m0["align_loss"], rtol=1e-6)
    assert not differ(m["orth_loss"], m0["orth_loss"], rtol=1e-3)
    assert stats_equal(s, s0, "mean") and stats_equal(s, s0, "var")
    m, s = runs["bn"]
    same(m["orth_loss"], m0["orth_loss"], rtol=1e-6)
    assert not differ(m["align_loss"], m0["align_loss"], rtol=1e-4)
    assert not stats_equal(s, s0, "mean")
    m, s = runs["var"]
    same(m["align_loss"], m0["align_loss"], rtol=1e-6)
    same(m["orth_loss"], m0["orth_loss"], rtol=1e-6)
    assert stats_equal(s, s0, "mean") and not stats_equal(s, s0, "var")


def _bns(stats: dict) -> list[dict]:
    """The {mean, var} dicts of a batch_stats tree, in a fixed order."""
    return [layer for head in sorted(stats) for _, layer in sorted(stats[head].items())]


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(8, 32)).astype(np.int32)
    mask = (np.arange(32)[None] < rng.integers(5, 32, size=(8, 1))).astype(np.int32)
    ids[:, 0] = 101  # [CLS]
    image = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    return {"image": image, "input_ids": ids * mask, "attention_mask": mask}


def test_loss_uses_the_frozen_lm_cls_and_never_its_gradient():
    method = get_method(tiny_mflag())
    batch = _batch()
    variables = jax.jit(lambda rng, b: strip_boxes(method.init(rng, b)))(
        jax.random.PRNGKey(0), batch
    )
    params = variables["params"]
    cfg = method.config.model
    # Independent of the method's plumbing: the towers applied directly.
    image_tower, text_tower = build_image_tower(cfg.image), build_text_tower(cfg.text)
    z = jax.jit(image_tower.apply)({"params": params["image"]}, batch["image"])["pooled"]
    tokens = jax.jit(text_tower.apply)(
        {"params": params["text"]}, batch["input_ids"], batch["attention_mask"]
    )["tokens"]
    inputs = {
        "z": np.asarray(z),
        "t": np.asarray(tokens[:, 0]),
        "proj_v": params["proj_v"],
        "proj_t": params["proj_t"],
    }
    want = np_total(jax.tree.map(lambda x: np.asarray(x, np.float64), inputs))[0]

    loss = jax.jit(lambda v, b: method.loss(v, b, jax.random.PRNGKey(1), train=True)[0])
    np.testing.assert_allclose(loss(variables, batch), want, rtol=1e-4)  # the LM runs
    cached = {**batch, "text_cls": inputs["t"]}
    np.testing.assert_allclose(loss(variables, cached), want, rtol=1e-4)  # the cache's field

    def grad_fn(m):
        fn = lambda p, key: m.loss({**variables, "params": p}, batch, key, train=True)[0]
        return jax.jit(jax.value_and_grad(fn))

    dropout = get_method(tiny_mflag("model.text_dropout_in_frozen_lm=true"))
    values = []
    for m in (method, dropout):
        value, g = grad_fn(m)(params, jax.random.PRNGKey(2))
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g["text"]))
        assert np.abs(np.asarray(g["proj_v"]["fc0"]["kernel"])).sum() > 0
        values.append(value)
    np.testing.assert_allclose(values[0], want, rtol=1e-4)
    # With dropout in the frozen LM (an option of ours; the released LM runs in eval mode),
    # [CLS] and so the loss change.
    assert not np.isclose(values[1], want, rtol=1e-4)


def test_bfloat16_features_give_a_float32_loss():
    """Towers computing in bfloat16 hand over bfloat16 Z and [CLS]; the loss stays float32."""
    method = get_method(tiny_mflag())
    inputs, stats = random_inputs(method)
    half = {**inputs, "z": inputs["z"].astype(jnp.bfloat16), "t": inputs["t"].astype(jnp.bfloat16)}
    loss, metrics, _ = jax.jit(lambda x, s: jax_total(method, x, s))(half, stats)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
    rounded = {**inputs, **{k: np.asarray(half[k], np.float64) for k in ("z", "t")}}
    np.testing.assert_allclose(loss, np_total(rounded)[0], rtol=1e-4)


def test_scratch_preset_drops_the_orthogonality_and_slows_only_the_text_projector():
    scratch = config_lib.load_config_file(str(ROOT / "configs/mflag.py:scratch"))
    config_lib.check_choices(scratch)
    method = get_method(tiny_mflag(f"model.orth_weight={scratch.model.orth_weight}"))
    inputs, stats = random_inputs(method)
    loss, metrics, _ = jax.jit(lambda x, s: jax_total(method, x, s))(inputs, stats)
    assert metrics["orth_loss"] > 0.1
    np.testing.assert_allclose(loss, metrics["align_loss"], rtol=1e-6)

    params = {"image": {"conv": {"kernel": 0}}, **{k: inputs[k] for k in ("proj_v", "proj_t")}}
    groups = optim.param_groups(optim.group_rules(scratch.optim, ()), params)
    assert {(g.frozen, g.lr, g.wd) for g in jax.tree.leaves(groups["proj_t"])} == {(False, 0.1, 1)}
    others = jax.tree.leaves({k: groups[k] for k in ("image", "proj_v")})
    assert set(others) == {optim.Group()}
