"""PRIOR's losses against an independent PyTorch re-derivation in the released code's loop
form (one report at a time, only its real sentences), on ragged sentence counts including a
one-sentence and an empty report: values and gradients; padded sentences get exactly zero
gradient. Matching against brute force."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medvlp_jax.bench import _prior_torch as prior_torch
from medvlp_jax.losses.local import local_infonce_loss
from medvlp_jax.losses.local_alignment import sigmoid_cross_attention, simsiam_loss
from medvlp_jax.losses.prototypes import prototype_kl_loss, quantization_loss
from medvlp_jax.methods.prior import matching
from medvlp_jax.parallel import mesh as mesh_lib

COUNTS = (3, 1, 0, 4, 2)  # sentences per report: ragged, one-sentence, empty
B, S, N, D = len(COUNTS), 4, 6, 8
PROJ = ("qi", "ki", "vi", "qt", "kt", "vt", "p1", "p2")


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, N, D)).astype(np.float32)
    texts = rng.normal(size=(B, S, D)).astype(np.float32)
    mask = np.arange(S)[None] < np.asarray(COUNTS)[:, None]
    weights = {k: (rng.normal(size=(D, D)) / np.sqrt(D)).astype(np.float32) for k in PROJ}
    weights["p1"] = weights["p1"][:, : D // 2]
    weights["p2"] = weights["p2"][: D // 2]
    return images, texts, mask, weights


def _jax_local(images, texts, mask, w, scale=10.0):
    """(L_li, L_lt) batched with masks."""
    att = sigmoid_cross_attention(
        texts @ w["qt"], images @ w["ki"], images @ w["vi"],
        images @ w["qi"], texts @ w["kt"], texts @ w["vt"], mask,
    )  # fmt: skip
    predict = lambda x: jax.nn.relu(x @ w["p1"]) @ w["p2"]
    has_text = jnp.any(mask, axis=1)[:, None]
    li = simsiam_loss(predict(images), predict(att["c_image"]), images, att["c_image"], has_text)
    lt = local_infonce_loss(att["c_text"], texts, mask, scale)
    return li, lt


def _torch_local(images, texts, w, scale=10.0):
    """The released code's per-report loop, on the real sentences of each report only."""
    w = {k: torch.tensor(v) for k, v in w.items()}
    proj = {k: prior_torch.linear(w[k]) for k in prior_torch.LOCAL_PROJECTIONS}
    predict = prior_torch.mlp(prior_torch.linear(w["p1"]), prior_torch.linear(w["p2"]))
    sentences = [texts[b, :n] for b, n in enumerate(COUNTS)]
    return prior_torch.local_losses(images, sentences, proj, predict, scale)


def test_local_losses_match_the_loop_form_with_gradients():
    images, texts, mask, w = _inputs()
    li, lt = _jax_local(images, texts, mask, w)
    grads = jax.grad(lambda i, t: sum(_jax_local(i, t, mask, w)), argnums=(0, 1))(images, texts)

    ti = torch.tensor(images, requires_grad=True)
    tt = torch.tensor(texts, requires_grad=True)
    ref_li, ref_lt = _torch_local(ti, tt, w)
    (ref_li + ref_lt).backward()
    np.testing.assert_allclose(float(li), ref_li.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(lt), ref_lt.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[0]), ti.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1]), tt.grad.numpy(), rtol=1e-4, atol=1e-6)
    # Padded sentences (and the empty report's rows) get exactly zero gradient; the empty
    # report's patches get none from the local losses either.
    assert np.all(np.asarray(grads[1])[~mask] == 0.0)
    assert np.all(np.asarray(grads[0])[COUNTS.index(0)] == 0.0)


def test_local_text_loss_of_a_one_sentence_report_is_zero():
    images, texts, mask, w = _inputs(1)
    one = np.zeros_like(mask)
    one[:, 0] = True
    assert float(_jax_local(images, texts, one, w)[1]) == pytest.approx(0.0, abs=1e-6)


def test_padded_sentences_change_nothing():
    images, texts, mask, w = _inputs(2)
    noisy = np.where(
        mask[..., None], texts, 1e3 * np.random.default_rng(3).normal(size=texts.shape)
    )
    for a, b in zip(_jax_local(images, texts, mask, w), _jax_local(images, noisy, mask, w)):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6)  # to rounding


def test_prototype_bank_losses_match_torch_and_ignore_padding():
    rng = np.random.default_rng(4)
    k = 7
    x = rng.normal(size=(B, S, D)).astype(np.float32)
    q = rng.normal(size=(B, S, D)).astype(np.float32)
    slots = rng.normal(size=(B, S, D)).astype(np.float32)
    codebook = rng.normal(size=(k, D)).astype(np.float32)
    mask = np.arange(S)[None] < np.asarray(COUNTS)[:, None]

    def ours(x, slots):
        return quantization_loss(q, x, mask) + prototype_kl_loss(x, slots, codebook, mask)

    value, (gx, gs) = jax.value_and_grad(ours, argnums=(0, 1))(x, slots)
    tx, ts = (torch.tensor(a[mask], requires_grad=True) for a in (x, slots))
    e = torch.tensor(codebook)
    l_q = prior_torch.quantization_loss(torch.tensor(q[mask]), tx)
    l_kl = prior_torch.prototype_kl(tx, ts, e)
    (l_q + l_kl).backward()
    np.testing.assert_allclose(float(value), (l_q + l_kl).item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx)[mask], tx.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gs)[mask], ts.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(gx)[~mask] == 0.0) and np.all(np.asarray(gs)[~mask] == 0.0)


def _brute_force(cost: np.ndarray) -> float:
    q = cost.shape[0]
    return min(sum(cost[i, p[i]] for i in range(q)) for p in itertools.permutations(range(q)))


def test_hungarian_matches_brute_force_and_padding_columns_do_not_matter():
    rng = np.random.default_rng(5)
    slots = rng.normal(size=(6, 5, 3)).astype(np.float32)
    targets = rng.normal(size=(6, 5, 3)).astype(np.float32)
    mask = np.arange(5)[None] < np.array([5, 3, 1, 0, 4, 2])[:, None]
    full = np.asarray(matching.l1_cost(slots, targets, None))
    ref = np.abs(slots[:, :, None] - targets[:, None]).sum(-1)
    np.testing.assert_allclose(full, ref, rtol=1e-6)
    col = matching.hungarian_host(full)
    for b in range(6):
        assert sorted(col[b]) == list(range(5))
        assert full[b, np.arange(5), col[b]].sum() == pytest.approx(_brute_force(full[b]))
    # With a mask the real targets get the best slots among all slot subsets.
    masked = np.asarray(matching.l1_cost(slots, targets, mask))
    col = matching.hungarian_host(masked)
    for b, n in enumerate(mask.sum(1).tolist()):
        got = sum(ref[b, i, col[b, i]] for i in range(5) if col[b, i] < n)
        best = min(
            (sum(ref[b, p[j], j] for j in range(n)) for p in itertools.permutations(range(5), n)),
            default=0.0,
        )
        assert got == pytest.approx(best, rel=1e-6)


def test_slot_index_inverts_the_assignment_and_the_released_index_does_not():
    col = jnp.array([[2, 0, 1, 3]])
    slots = jnp.arange(4.0)[None, :, None] * jnp.ones((1, 4, 2))
    ours = matching.matched_slots(slots, matching.slot_for_target(col))
    # target j gets the slot i with col[i] == j
    np.testing.assert_array_equal(np.asarray(ours[0, :, 0]), [1, 2, 0, 3])
    released = matching.matched_slots(slots, matching.slot_for_target(col, faithful_index=True))
    np.testing.assert_array_equal(np.asarray(released[0, :, 0]), [2, 0, 1, 3])


def test_assign_under_a_mesh_matches_the_host_inside_jit_and_grad():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), mesh_lib.MESH_AXES)
    rng = np.random.default_rng(6)
    cost = rng.random((16, 4, 4)).astype(np.float32)

    @jax.jit
    def f(c):
        col = matching.assign(jax.lax.stop_gradient(c), mesh)
        total = lambda z: jnp.sum(jnp.take_along_axis(z, col[..., None], axis=2))
        return col, jax.grad(total)(c)

    col, grad = f(cost)
    np.testing.assert_array_equal(np.asarray(col), matching.hungarian_host(cost))
    np.testing.assert_array_equal(np.asarray(grad), np.eye(4)[matching.hungarian_host(cost)])
