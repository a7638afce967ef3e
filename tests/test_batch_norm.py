"""Batch-norm modes (medvlp_jax/models/batch_norm.py) against numpy: per-device statistics on
2 and 8 simulated devices, PyTorch's unbiased running variance, the running averages of
device 0; the ResNet tower passes its mode to every batch norm; bad modes fail by name."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from medvlp_jax.models.batch_norm import BatchNormMode
from medvlp_jax.models.builders import build_image_tower, tower_config
from medvlp_jax.models.layers import batch_norm
from medvlp_jax.models.resnet import ResNet50
from medvlp_jax.parallel.mesh import MESH_AXES
from medvlp_jax.parallel.sharding import strip_boxes


def _mesh(devices: int):
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(
        (devices, 1, 1), MESH_AXES, axis_types=auto, devices=jax.devices()[:devices]
    )


def _under_mesh(fn, mesh):
    jitted = jax.jit(fn)

    def call(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    return call


def np_reference(x, scale, bias, shards, unbiased, eps=1e-5):
    """Each of `shards` contiguous row blocks normalised with its own statistics over rows and
    positions; the running-average targets are block 0's mean and (un)biased variance."""
    blocks = np.split(x.astype(np.float64), shards)
    out = []
    for block in blocks:
        flat = block.reshape(-1, x.shape[-1])
        out.append((block - flat.mean(0)) / np.sqrt(flat.var(0) + eps) * scale + bias)
    first = blocks[0].reshape(-1, x.shape[-1])
    n = len(first)
    return np.concatenate(out), first.mean(0), first.var(0) * (n / (n - 1) if unbiased else 1)


@pytest.mark.parametrize("devices", [2, 8])
@pytest.mark.parametrize("unbiased", [False, True])
def test_per_device_statistics_match_numpy(devices, unbiased):
    rng = np.random.default_rng(devices)
    x = rng.normal(2.0, 3.0, size=(16, 3, 3, 4)).astype(np.float32)
    x[8:] *= 5.0  # shards with different statistics
    layer = batch_norm(train=True, mode=BatchNormMode("per_device", unbiased))
    variables = strip_boxes(layer.init(jax.random.PRNGKey(0), x))
    scale = rng.normal(size=4).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    old = {"mean": rng.normal(size=4), "var": rng.uniform(0.5, 2, size=4)}
    variables = {
        "params": {"scale": scale, "bias": bias},
        "batch_stats": jax.tree.map(lambda v: v.astype(np.float32), old),
    }
    apply = _under_mesh(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]), _mesh(devices))
    y, state = apply(variables, x)
    want, mean, var = np_reference(x, scale, bias, devices, unbiased)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    got = state["batch_stats"]
    np.testing.assert_allclose(got["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(got["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-5)

    # Eval mode reads the running averages, whatever the mode.
    frozen = batch_norm(train=False, mode=BatchNormMode("per_device", unbiased))
    y_eval = _under_mesh(frozen.apply, _mesh(devices))(variables, x)
    expect = (x - old["mean"]) / np.sqrt(old["var"] + 1e-5) * scale + bias
    np.testing.assert_allclose(y_eval, expect, rtol=1e-4, atol=1e-4)


def test_global_unbiased_mode_uses_the_whole_batch_and_the_default_is_flax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    layer = batch_norm(train=True, mode=BatchNormMode("global", True))
    variables = strip_boxes(layer.init(jax.random.PRNGKey(0), x))
    y, state = _under_mesh(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]), _mesh(8))(
        variables, x
    )
    want, mean, var = np_reference(x, np.ones(5), np.zeros(5), 1, unbiased=True)
    np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)
    assert type(batch_norm(train=True)) is nn.BatchNorm


def test_resnet_per_device_statistics_equal_each_shard_run_alone():
    """Every batch norm of the tower follows its mode: on 2 devices the per-device tower's
    output is the global tower's on each half alone, and its running averages are half 0's."""
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 32, 32, 1)).astype(np.float32)
    images[2:] = images[2:] * 3 + 1
    per_device = ResNet50(1, num_stages=1, bn=BatchNormMode("per_device"))
    whole = ResNet50(1, num_stages=1)
    variables = strip_boxes(whole.init(jax.random.PRNGKey(0), images))

    def train_apply(tower):
        return lambda v, x: tower.apply(v, x, train=True, mutable=["batch_stats"])

    out, state = _under_mesh(train_apply(per_device), _mesh(2))(variables, images)
    halves = [jax.jit(train_apply(whole))(variables, h) for h in np.split(images, 2)]
    want = np.concatenate([np.asarray(h[0]["feature_map"]) for h in halves])
    np.testing.assert_allclose(out["feature_map"], want, rtol=1e-4, atol=1e-4)
    for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(halves[0][1]), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_bad_modes_fail_naming_the_field():
    cfg = tower_config("resnet50")
    cfg.bn_stats = "per_gpu"
    with pytest.raises(ValueError, match=r"bn_stats.*per_gpu"):
        build_image_tower(cfg)
    layer = batch_norm(train=True, mode=BatchNormMode("per_device"))
    x = np.zeros((6, 3), np.float32)
    with pytest.raises(ValueError, match="batch 6 does not divide into the mesh's 4 batch shards"):
        _under_mesh(lambda x: layer.init(jax.random.PRNGKey(0), x), _mesh(4))(x)
