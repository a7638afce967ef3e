"""CLIP / SigLIP losses: hand values, torch float64 references (value and autograd gradient),
and equality of the chunked and shard_map variants with the plain ones on 8 CPU devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp_jax.losses.contrastive import (
    CLIP_LOG_SCALE_INIT,
    SIGLIP_BIAS_INIT,
    SIGLIP_LOG_SCALE_INIT,
    clip_loss,
    logit_scale,
    sharded_clip_loss,
    sharded_siglip_loss,
    siglip_loss,
)

AXES = ("data", "fsdp", "tensor")

# Jitted once per module: eager dispatch compiles every primitive separately (slow on CPU).
clip_loss = jax.jit(clip_loss, static_argnames="chunk_size")
siglip_loss = jax.jit(siglip_loss, static_argnames="chunk_size")
logit_scale = jax.jit(logit_scale, static_argnames="max_scale")


def _mesh(shape):
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _pair(b=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, d)).astype(np.float32), rng.normal(size=(b, d)).astype(np.float32))


def _torch_clip(img, txt, scale):
    zi, zt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale * zi @ zt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _torch_siglip(img, txt, scale, bias):
    zi, zt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale * zi @ zt.T + bias
    z = 2 * torch.eye(img.shape[0], dtype=img.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


def _torch_value_and_grads(fn, *arrays):
    ts = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in arrays]
    value = fn(*ts)
    value.backward()
    return value.item(), [t.grad.numpy() for t in ts]


def test_clip_hand_value_orthonormal():
    # Unit orthogonal pairs: S = s * I, every row CE = log(1 + e^-s); input norms are irrelevant.
    img = np.array([[3.0, 0.0], [0.0, 0.5]], np.float32)
    txt = np.array([[2.0, 0.0], [0.0, 7.0]], np.float32)
    loss, metrics = clip_loss(img, txt, 1.0)
    expected = math.log(1 + math.exp(-1.0))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_i2t"], expected, rtol=1e-6)
    assert metrics["i2t_acc"] == 1.0 and metrics["t2i_acc"] == 1.0


def test_clip_accuracy_counts_wrong_rows():
    # Image 0 is closest to text 1: i2t 1 of 2 right. Text 0 is closest to image 0 or 1? see S.
    img = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    txt = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    _, m = clip_loss(img, txt, 10.0)
    # S = [[0, 10], [0, 10]]: rows argmax -> 1, 1 (row 1 right); columns argmax -> 0, 0 (col 0).
    assert m["i2t_acc"] == 0.5 and m["t2i_acc"] == 0.5


_clip_value_and_grads = jax.jit(
    jax.value_and_grad(lambda i, t, s: clip_loss(i, t, s)[0], argnums=(0, 1, 2))
)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_matches_torch_value_and_grad(scale):
    img, txt = _pair(seed=1)
    value, (g_img, g_txt, g_scale) = _torch_value_and_grads(_torch_clip, img, txt, scale)
    loss, grads = _clip_value_and_grads(img, txt, jnp.float32(scale))
    np.testing.assert_allclose(loss, value, rtol=2e-5)
    for got, want in zip(grads, (g_img, g_txt, g_scale)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_siglip_hand_value():
    # Unit orthogonal pairs: per row -log_sigmoid(t + b) - log_sigmoid(-b) (one negative each).
    img = np.eye(2, dtype=np.float32)
    loss, metrics = siglip_loss(img, img * 4, 10.0, -10.0)
    expected = math.log(2.0) + math.log1p(math.exp(-10.0))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert metrics["i2t_acc"] == 1.0


def test_siglip_matches_torch_value_and_grad():
    img, txt = _pair(seed=2)
    args = (img, txt, 7.0, -3.0)
    value, want = _torch_value_and_grads(_torch_siglip, *args)
    fn = lambda i, t, s, b: siglip_loss(i, t, s, b)[0]
    loss, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*map(jnp.float32, args))
    np.testing.assert_allclose(loss, value, rtol=2e-5)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_bf16_inputs_give_float32_loss():
    img, txt = _pair(seed=3)
    lo, _ = clip_loss(jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16), 10.0)
    assert lo.dtype == jnp.float32
    ref = _torch_clip(
        *(torch.tensor(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)) for a in (img, txt)),
        10.0,
    )
    np.testing.assert_allclose(lo, ref.item(), rtol=1e-5)
    s_loss, _ = siglip_loss(jnp.asarray(img, jnp.bfloat16), txt, 10.0, -10.0)
    assert s_loss.dtype == jnp.float32


def test_logit_scale_clip_on_value_and_zero_grad_when_clipped():
    np.testing.assert_allclose(logit_scale(jnp.float32(CLIP_LOG_SCALE_INIT)), 1 / 0.07, rtol=1e-6)
    np.testing.assert_allclose(logit_scale(jnp.float32(math.log(500.0))), 100.0)
    assert jax.grad(logit_scale)(jnp.float32(math.log(500.0))) == 0.0
    np.testing.assert_allclose(jax.grad(logit_scale)(jnp.float32(math.log(50.0))), 50.0, rtol=1e-6)
    unclipped = logit_scale(jnp.float32(math.log(500.0)), max_scale=None)
    np.testing.assert_allclose(unclipped, 500.0, rtol=1e-5)
    np.testing.assert_allclose(math.exp(SIGLIP_LOG_SCALE_INIT), 10.0)
    assert SIGLIP_BIAS_INIT == -10.0


def _grads(fn, img, txt, *params):
    """`((loss, metrics), grads)` of `fn(img, txt, *params)` w.r.t. all arguments, jitted."""
    argnums = tuple(range(2 + len(params)))
    return jax.jit(jax.value_and_grad(fn, argnums=argnums, has_aux=True))(
        img, txt, *map(jnp.float32, params)
    )


def _assert_same(a, b, tol=1e-5):
    """Same loss, metrics and gradients (to `tol`)."""
    ((loss_a, metrics_a), grads_a), ((loss_b, metrics_b), grads_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=tol, atol=tol)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=tol, atol=tol)
    for x, y in zip(grads_a, grads_b):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def reference():
    """Inputs and plain `clip_loss` / `siglip_loss` value and gradients, computed once."""
    img, txt = _pair(b=16, seed=5)
    return img, txt, _grads(clip_loss, img, txt, 20.0), _grads(siglip_loss, img, txt, 10.0, -10.0)


def test_chunked_equals_full(reference):
    img, txt, clip_ref, siglip_ref = reference
    _assert_same(clip_ref, _grads(lambda *a: clip_loss(*a, chunk_size=4), img, txt, 20.0))
    chunked = _grads(lambda *a: siglip_loss(*a, chunk_size=8), img, txt, 10.0, -10.0)
    _assert_same(siglip_ref, chunked)
    with pytest.raises(ValueError, match="chunk_size=5"):
        clip_loss(img, txt, 1.0, chunk_size=5)


def test_sharded_clip_data8_with_sharded_inputs(reference):
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"
    img, txt, clip_ref, _ = reference
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.NamedSharding(mesh, jax.P("data", None))
    img_s, txt_s = jax.device_put(img, sharding), jax.device_put(txt, sharding)
    fn = lambda *a: sharded_clip_loss(*a, mesh=mesh, batch_axes=("data",))
    _assert_same(clip_ref, _grads(fn, img_s, txt_s, 20.0))


@pytest.mark.parametrize("shape,chunk", [((2, 4, 1), None), ((2, 2, 2), 2)])
def test_sharded_clip_equals_clip(reference, shape, chunk):
    img, txt, clip_ref, _ = reference
    mesh = _mesh(shape)
    fn = lambda *a: sharded_clip_loss(*a, mesh=mesh, chunk_size=chunk)
    _assert_same(clip_ref, _grads(fn, img, txt, 20.0))


def test_sharded_siglip_equals_siglip(reference):
    img, txt, _, siglip_ref = reference
    fn = lambda *a: sharded_siglip_loss(*a, mesh=_mesh((2, 4, 1)))
    _assert_same(siglip_ref, _grads(fn, img, txt, 10.0, -10.0))


def test_sharded_bad_inputs_name_the_problem():
    mesh = _mesh((8, 1, 1))
    img, txt = _pair(b=12)
    with pytest.raises(ValueError, match="not divisible"):
        sharded_clip_loss(img, txt, 1.0, mesh=mesh)
    img, txt = _pair(b=16)
    with pytest.raises(ValueError, match="'dat'"):
        sharded_clip_loss(img, txt, 1.0, mesh=mesh, batch_axes=("dat",))
    with pytest.raises(ValueError, match=r"must both be \[B, D\]"):
        clip_loss(img, txt[:8], 1.0)
