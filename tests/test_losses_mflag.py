"""M-FLAG losses: alignment (4 - 4 cos) and orthogonality, incl. per-device vs global batch
under shard_map. References: hand values and torch float64 autograd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp_jax.losses.alignment import mflag_alignment_loss, negative_cosine_loss
from medvlp_jax.losses.orthogonality import orthogonality_loss

# Jitted once per module: eager dispatch compiles every primitive separately (slow on CPU).
mflag_alignment_loss = jax.jit(mflag_alignment_loss)
negative_cosine_loss = jax.jit(negative_cosine_loss)
orthogonality_loss = jax.jit(
    orthogonality_loss, static_argnames=("lambda_offdiag", "normalize", "axis_name")
)


def _torch_grad(fn, *arrays):
    ts = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in arrays]
    value = fn(*ts)
    value.backward()
    return value.item(), [t.grad.numpy() for t in ts]


def test_alignment_hand_values():
    p = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], np.float32)
    q = np.array([[5.0, 0.0], [0.0, -1.0], [0.0, 1.0]], np.float32)
    # cos = 1, -1, 0  ->  4 - 4 cos = 0, 8, 4  -> mean 4.
    np.testing.assert_allclose(mflag_alignment_loss(p, q), 4.0, rtol=1e-6)
    np.testing.assert_allclose(mflag_alignment_loss(p, p), 0.0, atol=1e-6)


def test_alignment_matches_torch():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(2, 6, 5)).astype(np.float32)
    ref = lambda a, b: (4 - 4 * F.cosine_similarity(a, b, dim=-1)).mean()
    value, want = _torch_grad(ref, p, q)
    got_v, got = jax.value_and_grad(mflag_alignment_loss, argnums=(0, 1))(p, q)
    np.testing.assert_allclose(got_v, value, rtol=1e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_negative_cosine_stops_target_gradient_and_masks():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]], bool)
    cos = F.cosine_similarity(*(torch.tensor(a, dtype=torch.float64) for a in (pred, target)), -1)
    expected = -cos.numpy()[mask].mean()
    np.testing.assert_allclose(negative_cosine_loss(pred, target, mask), expected, rtol=1e-5)
    g_pred, g_target = jax.grad(negative_cosine_loss, argnums=(0, 1))(pred, target, mask)
    assert np.all(np.asarray(g_target) == 0.0)
    assert np.all(np.asarray(g_pred)[~mask] == 0.0) and np.abs(g_pred).sum() > 0
    assert negative_cosine_loss(pred, target, np.zeros_like(mask)) == 0.0


def _torch_orth(z, lam, normalize):
    z = F.normalize(z, dim=-1) if normalize else z
    c = z.T @ z / z.shape[0]
    diag = torch.diagonal(c)
    off = c - torch.diag(diag)
    return 0.5 * (((diag - 1) ** 2).sum() + lam * (off**2).sum())


def test_orthogonality_hand_values():
    # C = I -> 0.   Z = all ones (B = D = 2): C = ones, diag term 0, two off-diag ones -> lam.
    np.testing.assert_allclose(orthogonality_loss(np.eye(2) * np.sqrt(2.0)), 0.0, atol=1e-6)
    np.testing.assert_allclose(orthogonality_loss(np.ones((2, 2))), 0.0051, rtol=1e-6)
    np.testing.assert_allclose(
        orthogonality_loss(np.ones((2, 2)), lambda_offdiag=1.0), 1.0, rtol=1e-6
    )
    # Raw, not centred: a constant feature column 3 gives C_00 = 9, (9 - 1)^2 / 2 = 32.
    z = np.array([[3.0], [3.0], [3.0]], np.float32)
    np.testing.assert_allclose(orthogonality_loss(z), 32.0, rtol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_orthogonality_matches_torch(normalize):
    rng = np.random.default_rng(2)
    z = np.abs(rng.normal(size=(12, 6))).astype(np.float32)
    value, (want,) = _torch_grad(lambda t: _torch_orth(t, 0.0051, normalize), z)
    fn = lambda x: orthogonality_loss(x, normalize=normalize)
    got_v, got = jax.value_and_grad(fn)(z)
    np.testing.assert_allclose(got_v, value, rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape,axes", [((8, 1), "data"), ((2, 4), ("data", "fsdp"))])
def test_orthogonality_global_vs_per_device_under_shard_map(shape, axes):
    mesh = jax.make_mesh(shape, ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    names = (axes,) if isinstance(axes, str) else axes
    rows = jax.P(names, None)
    z = np.abs(np.random.default_rng(3).normal(size=(16, 6))).astype(np.float32)

    global_fn = jax.jit(
        jax.shard_map(
            lambda x: orthogonality_loss(x, axis_name=axes),
            mesh=mesh,
            in_specs=rows,
            out_specs=jax.P(),
        )
    )
    np.testing.assert_allclose(global_fn(z), orthogonality_loss(z), rtol=1e-5)
    g_sharded = jax.jit(jax.grad(global_fn))(z)
    np.testing.assert_allclose(g_sharded, jax.grad(orthogonality_loss)(z), rtol=1e-4, atol=1e-6)

    per_device = jax.jit(
        jax.shard_map(
            lambda x: orthogonality_loss(x)[None], mesh=mesh, in_specs=rows, out_specs=jax.P(names)
        )
    )(z)
    expected = [orthogonality_loss(chunk) for chunk in np.split(z, 8)]
    np.testing.assert_allclose(per_device, expected, rtol=1e-5)
    assert not np.allclose(per_device, orthogonality_loss(z))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        orthogonality_loss(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="same shape"):
        mflag_alignment_loss(jnp.ones((2, 3)), jnp.ones((2, 4)))
