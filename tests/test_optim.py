"""Optimizer construction: freezing allocates no state, multipliers and schedules apply."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medvlp_jax import config as config_lib
from medvlp_jax import optim


def _params():
    return {
        "img": {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}},
        "txt": {"dense": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros(3)}},
        "head": {"kernel": jnp.ones((3, 2))},
    }


def _cfg(**kw):
    cfg = config_lib.base_config().optim
    cfg.update(kw)
    return cfg


def test_frozen_params_get_no_optimizer_state():
    params = _params()
    cfg = _cfg(freeze=("txt/.*",))
    trainable = jax.tree.map(lambda _: True, params)
    tx, _ = optim.build(cfg, params, trainable, num_steps=10)
    state = tx.init(params)
    n_state = sum(x.size for x in jax.tree.leaves(state))
    # Adam keeps mu and nu for the 4*3+3+2*3=21 trainable weights, plus scalar counts.
    trainable_size = 12 + 3 + 6
    assert 2 * trainable_size <= n_state <= 2 * trainable_size + 4


def test_trainable_mask_joins_the_method_mask_and_the_freeze_patterns():
    params = _params()
    cfg = _cfg(freeze=("txt/.*",))
    method_mask = jax.tree.map(lambda _: True, params)
    method_mask["head"]["kernel"] = False
    mask = optim.trainable_mask(cfg, params, method_mask)
    assert mask == {
        "img": {"dense": {"kernel": True, "bias": True}},
        "txt": {"dense": {"kernel": False, "bias": False}},
        "head": {"kernel": False},
    }


def test_frozen_updates_are_zero_and_multipliers_scale():
    params = _params()
    cfg = _cfg(
        freeze=("txt/.*",),
        lr_multipliers=("head/.*=5",),
        schedule="constant",
        weight_decay=0.0,
        clip_grad_norm=0.0,
        name="sgd",
        momentum=0.0,
        lr=0.1,
    )
    trainable = jax.tree.map(lambda _: True, params)
    tx, _ = optim.build(cfg, params, trainable, num_steps=10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["txt"]["dense"]["kernel"], 0.0)
    np.testing.assert_allclose(updates["img"]["dense"]["kernel"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.5, rtol=1e-6)


def test_warmup_then_cosine_schedule_values():
    cfg = _cfg(lr=1.0, warmup_steps=10, warmup_init_lr=0.0, schedule="cosine", end_lr=0.0)
    lr = optim.schedule(cfg, num_steps=110)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 0.5, rtol=1e-5)  # half-way through the cosine
    np.testing.assert_allclose(float(lr(110)), 0.0, atol=1e-6)


def test_cosine_restarts_return_to_peak():
    cfg = _cfg(lr=2.0, schedule="cosine_restarts", restart_period=10, end_lr=0.0)
    lr = optim.schedule(cfg, num_steps=30)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 10, 20)], 2.0, rtol=1e-6)
    assert float(lr(9)) < 0.1


def test_no_decay_on_bias_with_adamw():
    params = _params()
    cfg = _cfg(weight_decay=0.5, lr=1.0, schedule="constant", clip_grad_norm=0.0)
    trainable = jax.tree.map(lambda _: True, params)
    tx, _ = optim.build(cfg, params, trainable, num_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    params = jax.tree.map(lambda p: p + 1.0, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradient: the only update is decay, -lr * wd * p, and none on biases.
    np.testing.assert_allclose(updates["img"]["dense"]["kernel"], -0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["img"]["dense"]["bias"], 0.0)


def test_grad_accumulation_applies_every_k():
    params = {"w": jnp.ones(3)}
    cfg = _cfg(
        grad_accum_steps=2,
        schedule="constant",
        name="sgd",
        momentum=0.0,
        lr=1.0,
        weight_decay=0.0,
        clip_grad_norm=0.0,
    )
    tx, _ = optim.build(cfg, params, {"w": True}, num_steps=10)
    state = tx.init(params)
    u1, state = tx.update({"w": jnp.full(3, 1.0)}, state, params)
    u2, state = tx.update({"w": jnp.full(3, 3.0)}, state, params)
    np.testing.assert_array_equal(u1["w"], 0.0)
    np.testing.assert_allclose(u2["w"], -2.0)  # mean of the two gradients
    assert isinstance(tx, optax.GradientTransformation)
