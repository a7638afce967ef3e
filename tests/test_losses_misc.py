"""MCPL relation consistency, ITM, MLM, PRIOR local InfoNCE and prototype-bank losses against
hand values and torch float64 references (value and gradient)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvlp_jax.losses.local import local_infonce_loss
from medvlp_jax.losses.matching import itm_loss
from medvlp_jax.losses.mlm import mlm_loss
from medvlp_jax.losses.prompts import relation_consistency_loss
from medvlp_jax.losses.prototypes import (
    assign_prototypes,
    gumbel_softmax,
    prototype_kl_loss,
    quantization_loss,
)

RNG = np.random.default_rng(0)

# Jitted once per module: eager dispatch compiles every primitive separately (slow on CPU).
relation_consistency_loss = jax.jit(relation_consistency_loss)
itm_loss = jax.jit(itm_loss)
mlm_loss = jax.jit(mlm_loss)
local_infonce_loss = jax.jit(local_infonce_loss, static_argnames="symmetric")
gumbel_softmax = jax.jit(gumbel_softmax)
assign_prototypes = jax.jit(assign_prototypes)
quantization_loss = jax.jit(quantization_loss)
prototype_kl_loss = jax.jit(prototype_kl_loss)


def _t(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


def _check_grad(jax_fn, torch_fn, *arrays, rtol=1e-4):
    """Compares value and gradient w.r.t. the first argument."""
    x = _t(arrays[0], grad=True)
    ref = torch_fn(x, *(_t(a) if a.dtype.kind == "f" else torch.tensor(a) for a in arrays[1:]))
    ref.backward()
    value, grad = jax.jit(jax.value_and_grad(jax_fn))(*arrays)
    np.testing.assert_allclose(value, ref.item(), rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=rtol, atol=1e-6)


def test_relation_consistency():
    a = np.array([[[0.5, 1.0]]], np.float32)
    b = np.array([[[0.0, 0.0]]], np.float32)
    np.testing.assert_allclose(relation_consistency_loss(a, b), 2 * 0.75)
    r_img, r_txt = RNG.random((2, 3, 6, 10)).astype(np.float32)
    _check_grad(relation_consistency_loss, lambda x, y: 2 * (x - y).abs().mean(), r_img, r_txt)


def test_itm_loss_hand_and_torch():
    logits = np.array([[0.0, 0.0], [2.0, 0.0]], np.float32)
    loss, m = itm_loss(logits, np.array([1, 0]))
    np.testing.assert_allclose(loss, (math.log(2) + math.log1p(math.exp(-2))) / 2, rtol=1e-6)
    assert m["itm_acc"] == 0.5  # the 0/0 tie resolves to class 0 (argmax), label 1 -> wrong
    logits = RNG.normal(size=(8, 2)).astype(np.float32)
    labels = RNG.integers(0, 2, size=8)
    _check_grad(lambda x, y: itm_loss(x, y)[0], F.cross_entropy, logits, labels)
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        itm_loss(np.zeros((4, 3)), np.zeros(4, int))


def test_mlm_loss_masked_mean_matches_torch():
    logits = RNG.normal(size=(3, 5, 11)).astype(np.float32)
    labels = RNG.integers(0, 11, size=(3, 5))
    mask = RNG.random((3, 5)) < 0.4
    mask[0, 0] = True
    torch_labels = np.where(mask, labels, -100)  # torch's ignore_index convention

    def ref(x, y):
        return F.cross_entropy(x.reshape(-1, 11), y.reshape(-1), ignore_index=-100)

    jax_fn = lambda x, y: mlm_loss(x, jnp.where(mask, y, -100), mask)[0]
    _check_grad(jax_fn, lambda x, _: ref(x, torch.tensor(torch_labels)), logits, labels)
    _, m = mlm_loss(logits, labels, mask)
    assert m["mlm_tokens"] == mask.sum()
    acc = (logits.argmax(-1) == labels)[mask].mean()
    np.testing.assert_allclose(m["mlm_acc"], acc, rtol=1e-6)


def test_mlm_loss_zero_safe_without_masked_positions():
    logits = RNG.normal(size=(2, 4, 7)).astype(np.float32)
    labels = np.full((2, 4), -100)
    none = np.zeros((2, 4), bool)
    fn = lambda x: mlm_loss(x, labels, none)[0]
    assert fn(logits) == 0.0
    grad = jax.grad(fn)(logits)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0.0)


def _torch_local(a, b, mask, scale):
    """Per-report loop reference: symmetric CE over the valid sentences, mean over reports."""
    per_report = []
    for i in range(a.shape[0]):
        idx = torch.nonzero(torch.tensor(mask[i])).flatten()
        if len(idx) == 0:
            per_report.append(a.sum() * 0)
            continue
        logits = scale * F.normalize(a[i, idx], dim=-1) @ F.normalize(b[i, idx], dim=-1).T
        target = torch.arange(len(idx))
        per_report.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)
    return torch.stack(per_report).mean()


def test_local_infonce_hand_values():
    e = np.eye(3, dtype=np.float32)
    a = np.stack([e, e, e])  # 3 reports x 3 sentences, orthonormal
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    # report 0: two orthonormal sentences, each CE = log(1 + e^-s); reports 1, 2 contribute 0.
    s = 2.0
    expected = math.log1p(math.exp(-s)) / 3
    np.testing.assert_allclose(local_infonce_loss(a, a, mask, s), expected, rtol=1e-6)
    one_sentence = local_infonce_loss(a[1:2], RNG.normal(size=(1, 3, 3)), mask[1:2], 100.0)
    assert one_sentence == 0.0


def test_local_infonce_matches_torch_loop():
    a, b = RNG.normal(size=(2, 4, 5, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    ref = lambda x, y: _torch_local(x, y, mask, 10.0)
    _check_grad(lambda x, y: local_infonce_loss(x, y, mask, 10.0), ref, a, b)
    grad_b = jax.grad(local_infonce_loss, argnums=1)(a, b, mask, 10.0)
    assert np.all(np.asarray(grad_b)[~mask] == 0.0)  # padding gets no gradient


def test_gumbel_softmax_eval_and_noise():
    logits = np.array([[2.0, 0.5, -1.0]], np.float32)
    np.testing.assert_allclose(
        gumbel_softmax(None, logits, 0.9), torch.softmax(_t(logits) / 0.9, -1), rtol=1e-6
    )
    key = jax.random.key(0)
    noise = np.asarray(jax.random.gumbel(key, logits.shape, jnp.float32))
    np.testing.assert_allclose(
        gumbel_softmax(key, logits, 0.5), torch.softmax(_t(logits + noise) / 0.5, -1), rtol=1e-5
    )
    # Gumbel-max: argmax of the noisy weights is distributed as softmax(logits).
    draws = gumbel_softmax(jax.random.key(1), np.repeat(logits, 20000, axis=0), 0.9)
    freq = np.bincount(np.asarray(draws).argmax(-1), minlength=3) / 20000
    np.testing.assert_allclose(freq, torch.softmax(_t(logits[0]), -1), atol=0.015)


def test_assign_prototypes_and_quantization_loss():
    x = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    codebook = RNG.normal(size=(5, 4)).astype(np.float32)
    q, w = assign_prototypes(x, codebook, rng=None, tau=0.9)
    w_ref = torch.softmax(_t(x) @ _t(codebook).T / 0.9, -1)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5)
    np.testing.assert_allclose(q, (w_ref @ _t(codebook)).numpy(), rtol=1e-5, atol=1e-6)
    q_train, _ = assign_prototypes(x, codebook, rng=jax.random.key(0))
    assert not np.allclose(q_train, q)

    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)

    def ref(xx, e):
        qq = torch.softmax(xx @ e.T / 0.9, -1) @ e
        return (qq - xx).abs()[torch.tensor(mask)].mean()

    def jax_fn(xx, e):
        return quantization_loss(assign_prototypes(xx, e)[0], xx, mask)

    _check_grad(jax_fn, ref, x, codebook)
    _check_grad(lambda e, xx: jax_fn(xx, e), lambda e, xx: ref(xx, e), codebook, x)
    assert quantization_loss(q, x, np.zeros_like(mask)) == 0.0


def test_prototype_kl_loss():
    target, pred = RNG.normal(size=(2, 6, 4)).astype(np.float32)
    codebook = RNG.normal(size=(5, 4)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0, 1], bool)

    def ref(p_in, t_in, e):
        log_p = F.log_softmax(t_in @ e.T, -1)[torch.tensor(mask)]
        log_q = F.log_softmax(p_in @ e.T, -1)[torch.tensor(mask)]
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")

    _check_grad(
        lambda p_in, t_in, e: prototype_kl_loss(t_in, p_in, e, mask), ref, pred, target, codebook
    )
    np.testing.assert_allclose(prototype_kl_loss(target, target, codebook), 0.0, atol=1e-6)
