"""Optimizer construction: the ordered group table (first match wins), frozen parameters hold
no state, lr / wd multipliers apply, schedules, and gradient accumulation over the whole run."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medvlp_jax import config as config_lib
from medvlp_jax import optim
from medvlp_jax.methods.base import get_method
from medvlp_jax.parallel.sharding import strip_boxes

ROOT = Path(__file__).resolve().parents[1]


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


def _sgd(**kw):
    """Plain SGD (no momentum, decay or clipping) at a constant lr: update = -lr * grad."""
    base = dict(name="sgd", momentum=0.0, schedule="constant", weight_decay=0.0, clip_grad_norm=0)
    return _cfg(**{**base, **kw})


def _build(cfg, params, method_rules=(), num_steps=10):
    return optim.build(cfg, params, optim.group_rules(cfg, method_rules), num_steps)


def _update(tx, params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_first_match_wins_so_row_order_matters():
    params = _params()
    frozen_first = ("txt/.* -> frozen", ".*/kernel -> lr=2")
    groups = optim.param_groups(optim.group_rules(_cfg(groups=frozen_first), ()), params)
    assert groups["txt"]["dense"]["kernel"] == optim.Group(frozen=True, rule="txt/.* -> frozen")
    assert groups["img"]["dense"]["kernel"] == optim.Group(lr=2.0, rule=".*/kernel -> lr=2")
    swapped = frozen_first[::-1]
    groups = optim.param_groups(optim.group_rules(_cfg(groups=swapped), ()), params)
    assert groups["txt"]["dense"]["kernel"] == optim.Group(lr=2.0, rule=".*/kernel -> lr=2")
    assert groups["txt"]["dense"]["bias"].frozen
    assert optim.trainable_mask(optim.group_rules(_cfg(groups=swapped), ()), params)["txt"] == {
        "dense": {"kernel": True, "bias": False}
    }


def test_a_row_shadowed_by_earlier_rows_is_an_error():
    rules = optim.group_rules(_cfg(groups=(".* -> lr=2", "txt/.* -> frozen")), ())
    with pytest.raises(config_lib.ConfigError, match=r"optim.groups\[1\].*earlier row"):
        optim.param_groups(rules, _params())


def test_method_rows_come_before_the_config_rows():
    cfg = _cfg(groups=("txt/.* -> lr=3",))
    rules = optim.group_rules(cfg, ("txt/dense/kernel -> frozen", "nothing/.* -> frozen"))
    groups = optim.param_groups(rules, _params())  # a method row may match nothing
    assert groups["txt"]["dense"]["kernel"].frozen
    assert groups["txt"]["dense"]["bias"] == optim.Group(lr=3.0, rule="txt/.* -> lr=3")
    assert groups["head"]["kernel"] == optim.Group()  # unmatched: lr x1 wd x1, no row


def test_frozen_params_get_no_optimizer_state_and_zero_updates():
    params = _params()
    tx, _ = _build(_cfg(groups=("txt/.* -> frozen",)), params)
    n_state = sum(x.size for x in jax.tree.leaves(tx.init(params)))
    # Adam keeps mu and nu for the 4*3+3+2*3=21 trainable weights, plus scalar counts.
    trainable_size = 12 + 3 + 6
    assert 2 * trainable_size <= n_state <= 2 * trainable_size + 4
    updates = _update(tx, params, jax.tree.map(jnp.ones_like, params))
    np.testing.assert_array_equal(updates["txt"]["dense"]["kernel"], 0.0)
    np.testing.assert_array_equal(updates["txt"]["dense"]["bias"], 0.0)
    assert np.all(np.asarray(updates["img"]["dense"]["kernel"]) != 0.0)


def test_lr_multipliers_scale_sgd_updates():
    params = _params()
    cfg = _sgd(lr=0.1, groups=("head/.* -> lr=5", "txt/.* -> lr=0.5 wd=3", "img/.* -> wd=2"))
    updates = _update(_build(cfg, params)[0], params, jax.tree.map(jnp.ones_like, params))
    # -lr * factor * grad (weight decay is 0 here, so wd multipliers change nothing)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["txt"]["dense"]["kernel"], -0.05, rtol=1e-6)
    np.testing.assert_allclose(updates["img"]["dense"]["kernel"], -0.1, rtol=1e-6)


def test_wd_multipliers_scale_decoupled_decay_and_no_decay_stays():
    groups = ("img/.* -> wd=2", "head/.* -> lr=0.5 wd=0.1", "txt/dense/kernel -> wd=0")
    cfg = _cfg(weight_decay=0.5, lr=1.0, schedule="constant", clip_grad_norm=0.0, groups=groups)
    params = jax.tree.map(lambda p: p + 1.0, _params())
    updates = _update(_build(cfg, params)[0], params, jax.tree.map(jnp.zeros_like, params))
    # Zero gradient: AdamW's only update is the decay, -lr_mult * lr * wd_mult * wd * p.
    np.testing.assert_allclose(updates["img"]["dense"]["kernel"], -2 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.5 * 0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["txt"]["dense"]["kernel"], 0.0)
    # `optim.no_decay` still applies on top: biases never decay, whatever the row says.
    np.testing.assert_array_equal(updates["img"]["dense"]["bias"], 0.0)


def test_no_decay_on_bias_with_adamw():
    params = jax.tree.map(lambda p: p + 1.0, _params())
    cfg = _cfg(weight_decay=0.5, lr=1.0, schedule="constant", clip_grad_norm=0.0)
    updates = _update(_build(cfg, params)[0], params, jax.tree.map(jnp.zeros_like, params))
    np.testing.assert_allclose(updates["img"]["dense"]["kernel"], -0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["img"]["dense"]["bias"], 0.0)


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ("txt/.*", "expected 'REGEX -> frozen'"),
        (" -> frozen", "expected 'REGEX -> frozen'"),
        ("txt/.* ->", "after '->'"),
        ("txt/( -> frozen", "bad regex"),
        ("txt/.* -> lr=fast", "not a number"),
        ("txt/.* -> lr=-1", ">= 0"),
        ("txt/.* -> lr=nan", ">= 0"),
        ("txt/.* -> lr=1 lr=2", "given twice"),
        ("txt/.* -> lr=1 momentum=0", "unknown option 'momentum=0'"),
        ("txt/.* -> frozen lr=2", "unknown option 'frozen'"),
        ("txt/.* -> freeze", "unknown option 'freeze'"),
    ],
)
def test_malformed_rows_name_the_row(row, why):
    cfg = _cfg(groups=("head/.* -> lr=2", row))
    with pytest.raises(config_lib.ConfigError) as e:
        optim.group_rules(cfg, ())
    assert "optim.groups[1]" in str(e.value) and repr(row) in str(e.value)
    assert why in str(e.value)


def test_malformed_method_rows_are_named_too():
    with pytest.raises(config_lib.ConfigError, match=r"method row 0 = 'text/\.\*'"):
        optim.group_rules(_cfg(), ("text/.*",))


def test_a_config_row_that_matches_nothing_is_an_error():
    rules = optim.group_rules(_cfg(groups=("img/.* -> lr=2", "text/.* -> frozen")), ())
    with pytest.raises(config_lib.ConfigError) as e:
        optim.param_groups(rules, _params())  # the tree calls it `txt`
    assert "optim.groups[1] = 'text/.* -> frozen'" in str(e.value)
    assert "matches no parameter" in str(e.value)
    with pytest.raises(config_lib.ConfigError, match=r"optim.groups\[1\]"):
        optim.build(_cfg(groups=("img/.* -> lr=2", "text/.* -> frozen")), _params(), rules, 10)


def test_group_table_lists_every_parameter_and_the_totals():
    cfg = _cfg(groups=("txt/.* -> frozen", "head/.* -> lr=0.1 wd=0"))
    table = optim.group_table(optim.group_rules(cfg, ()), _params())
    lines = table.splitlines()
    assert len(lines) == 1 + 5 + 1  # header, one line per parameter, totals
    txt_kernel = next(line for line in lines if line.startswith("txt/dense/kernel"))
    assert txt_kernel.split()[1:] == ["(5,", "3)", "15", "frozen", "txt/.*", "->", "frozen"]
    head = next(line for line in lines if line.startswith("head/kernel"))
    assert "lr x0.1 wd x0" in head and head.endswith("head/.* -> lr=0.1 wd=0")
    assert lines[-1] == "trainable 21 of 39 parameters (53.8%); frozen 18"


def test_boxed_and_unboxed_params_share_paths():
    import flax.linen as nn

    boxed = {"w": nn.Partitioned(jnp.ones(2), ("embed",))}
    assert optim.param_paths(boxed)["w"].value == "w"


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


def test_grad_accumulation_applies_every_k():
    params = {"w": jnp.ones(3)}
    tx, _ = _build(_sgd(grad_accum_steps=2, lr=1.0), params)
    state = tx.init(params)
    u1, state = tx.update({"w": jnp.full(3, 1.0)}, state, params)
    u2, state = tx.update({"w": jnp.full(3, 3.0)}, state, params)
    np.testing.assert_array_equal(u1["w"], 0.0)
    np.testing.assert_allclose(u2["w"], -2.0)  # mean of the two gradients
    assert isinstance(tx, optax.GradientTransformation)


def test_grad_accumulation_traverses_the_schedule_once_over_the_run():
    """k=4, 40 train steps: 10 optimizer updates, the last one at (nearly) end_lr. Building the
    schedule over the 40 train steps, as before, leaves the last update at ~0.89."""
    k, num_steps, lr, end_lr = 4, 40, 1.0, 0.1
    cfg = _sgd(grad_accum_steps=k, lr=lr, end_lr=end_lr, schedule="cosine")
    assert optim.num_updates(cfg, num_steps) == 10
    params = {"w": jnp.zeros(())}
    tx, lr_fn = _build(cfg, params, num_steps=num_steps)
    state = tx.init(params)
    applied = []  # the lr of each real update: -update / grad, grad = 1
    for _ in range(num_steps):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        if float(updates["w"]) != 0.0:
            applied.append(-float(updates["w"]))
    assert len(applied) == num_steps // k
    expected_last = end_lr + (lr - end_lr) * 0.5 * (1 + np.cos(np.pi * 9 / 10))  # 0.122
    np.testing.assert_allclose(applied[-1], expected_last, rtol=1e-5)
    assert abs(applied[-1] - end_lr) < 0.05
    for step in range(num_steps):
        logged = float(optim.applied_lr(cfg, lr_fn, jnp.int32(step)))
        np.testing.assert_allclose(logged, applied[step // k], rtol=1e-5)


def test_num_updates_needs_whole_accumulations():
    assert optim.num_updates(_cfg(grad_accum_steps=1), 7) == 7
    with pytest.raises(config_lib.ConfigError, match=r"optim\.grad_accum_steps=4"):
        optim.num_updates(_cfg(grad_accum_steps=4), 42)
    with pytest.raises(config_lib.ConfigError, match=r"optim\.grad_accum_steps=0"):
        optim.num_updates(_cfg(grad_accum_steps=0), 40)


def _tiny_params(spec: str, *overrides: str):
    """(config, method, unboxed abstract params) of a tiny preset; nothing is trained."""
    config = config_lib.load_config_file(str(ROOT / spec))
    config = config_lib.apply_overrides(config, list(overrides))
    method = get_method(config)
    b, s, t = 2, config.data.image_size, config.data.max_text_len
    batch = {
        "image": jax.ShapeDtypeStruct((b, s, s, config.data.channels), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
    }
    if "ap_max_len" in config.model:  # MCPL's anatomy-pathology prompts
        ap = jax.ShapeDtypeStruct((b, 2, config.model.ap_max_len), jnp.int32)
        batch.update(ap_ids=ap, ap_mask=ap)
    variables = jax.eval_shape(method.init, jax.random.PRNGKey(0), batch)
    return config, method, strip_boxes(variables)["params"]


def _frozen_top_level(spec: str, *overrides: str) -> dict:
    """{top-level name: (any frozen, all frozen)} under the method's rows and the config's."""
    config, method, params = _tiny_params(spec, *overrides)
    mask = optim.trainable_mask(optim.group_rules(config.optim, method.group_rules()), params)
    return {k: (not all(jax.tree.leaves(v)), not any(jax.tree.leaves(v))) for k, v in mask.items()}


def test_mflag_rows_freeze_the_language_model_only():
    frozen = _frozen_top_level("configs/mflag.py:tiny")
    assert frozen.pop("text") == (True, True)
    assert frozen and all(f == (False, False) for f in frozen.values())


def test_mcpl_rows_freeze_the_backbone_only():
    frozen = _frozen_top_level("configs/mcpl.py:tiny")
    assert frozen.pop("backbone") == (True, True)
    assert frozen and all(f == (False, False) for f in frozen.values())


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_clip_rows_freeze_the_temperature_only_when_it_is_fixed(loss):
    fixed = _frozen_top_level(
        "configs/clip.py:tiny", "model.learn_temperature=false", f"model.loss={loss}"
    )
    scalars = {"log_scale", "bias"} if loss == "siglip" else {"log_scale"}
    assert {k for k, (_, all_frozen) in fixed.items() if all_frozen} == scalars
    assert all(not any_frozen for k, (any_frozen, _) in fixed.items() if k not in scalars)
    learned = _frozen_top_level("configs/clip.py:tiny", f"model.loss={loss}")
    assert not any(any_frozen for any_frozen, _ in learned.values())
