"""Shared blocks and prompt hooks against numpy re-derivations of their equations."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax.models import (
    AttentionPool,
    CoAttentionFusion,
    CoAttentionLayer,
    LayerPrompts,
    MLPHead,
    TransformerConfig,
    TransformerLayer,
    TransformerStack,
    build_image_tower,
    build_text_tower,
    tower_config,
)
from medvlp_jax.models.attention import MultiHeadAttention, attend
from medvlp_jax.models.testing import fast_compile, random_variables

D, H = 16, 2
CFG = TransformerConfig(width=D, num_layers=2, num_heads=H, mlp_dim=24, activation="gelu")


@pytest.fixture(autouse=True)
def _fast_compile():
    with fast_compile():
        yield


def _rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(tree))


# ------------------------------------------------------------------ numpy references


def np_ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_mha(p, xq, xk, xv, key_mask=None, causal=False):
    """Multi-head attention; key_mask [B, S] (1 = attend)."""
    proj = lambda x, n: np.einsum("btd,dhk->bthk", x, p[n]["kernel"]) + p[n]["bias"]
    q, k, v = proj(xq, "query"), proj(xk, "key"), proj(xv, "value")
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = np.where(key_mask[:, None, None, :] > 0, logits, -1e30)
    if causal:
        t, s = logits.shape[-2:]
        logits = np.where(np.tril(np.ones((t, s))) > 0, logits, -1e30)
    o = np.einsum("bhts,bshk->bthk", np_softmax(logits), v)
    return np.einsum("bthk,hkd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]


def np_gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_mlp(p, x):
    h = np_gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def np_pre_ln_layer(p, x, values=None, key_mask=None, causal=False):
    h = np_ln(x, p["attn_norm"])
    hv = h if values is None else np_ln(values, p["attn_norm"])
    x = x + np_mha(p["attn"], h, h, hv, key_mask, causal)
    return x + np_mlp(p["mlp"], np_ln(x, p["mlp_norm"]))


def np_post_ln_layer(p, x, key_mask=None):
    h = np_ln(x + np_mha(p["attn"], x, x, x, key_mask), p["attn_norm"])
    return np_ln(h + np_mlp(p["mlp"], h), p["mlp_norm"])


# ------------------------------------------------------------------ attention and layers


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_self_attention_with_padding_and_causal_mask(fused_qkv):
    x = _rand(2, 5, D)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mha = MultiHeadAttention(H, fused_qkv=fused_qkv)
    v = random_variables(mha, x, std=0.3)
    bool_mask = jnp.asarray(mask, bool)[:, None, None, :]
    for causal in (False, True):
        run = jax.jit(lambda v, x, m, c=causal: mha.apply(v, x, mask=m, causal=c))
        out = run(v, x, bool_mask)
        ref = np_mha(_np(v)["params"], x, x, x, mask, causal)
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_cross_attention_and_explicit_dropout_path():
    x, y = _rand(2, 3, D), _rand(2, 6, 12, seed=1)
    mha = MultiHeadAttention(H, out_features=8)
    v = random_variables(mha, x, y, std=0.3)
    out = jax.jit(mha.apply)(v, x, y)
    assert out.shape == (2, 3, 8)
    np.testing.assert_allclose(out, np_mha(_np(v)["params"], x, y, y), atol=1e-5)
    # The explicit-probabilities path (used with attention dropout) equals the fused one.
    q, k = jnp.asarray(_rand(2, 4, H, 8)), jnp.asarray(_rand(2, 4, H, 8, seed=2))
    mask = jnp.asarray([[1, 1, 0, 1], [1, 1, 1, 1]], bool)[:, None, None, :]

    @jax.jit
    def both(q, k, mask):
        fused = attend(q, k, k, mask=mask, causal=True)
        explicit = nn.Dropout(1e-9).apply(
            {},
            method=lambda d: attend(
                q, k, k, mask=mask, causal=True, dropout=d, deterministic=False
            ),
            rngs={"dropout": jax.random.key(1)},
        )
        return fused, explicit

    fused, explicit = both(q, k, mask)
    np.testing.assert_allclose(explicit, fused, atol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_layer_matches_numpy(norm_first):
    cfg = TransformerConfig(D, 1, H, 24, norm_first=norm_first)
    x, mask = _rand(2, 5, D), np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    layer = TransformerLayer(cfg)
    kpm = jnp.asarray(mask, bool)[:, None, None, :]
    v = random_variables(layer, x, kpm, std=0.3)
    p = _np(v)["params"]
    ref = np_pre_ln_layer(p, x, key_mask=mask) if norm_first else np_post_ln_layer(p, x, mask)
    np.testing.assert_allclose(jax.jit(layer.apply)(v, x, kpm), ref, atol=2e-5)


def test_co_attention_layer_equations():
    """h1 = LN(x + SA(x)); h2 = LN(h1 + CA(h1, y)); out = LN(h2 + FFN(h2)), both streams."""
    cfg = TransformerConfig(D, 1, H, 24, norm_first=False)
    x, y = _rand(2, 4, D), _rand(2, 6, D, seed=1)
    y_mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6])
    layer = CoAttentionLayer(cfg)
    v = random_variables(layer, x, y, None, y_mask, std=0.3)
    x_out, y_out = jax.jit(layer.apply)(v, x, y, None, y_mask)
    p = _np(v)["params"]

    def stream(p, a, b, a_mask, b_mask):
        h1 = np_ln(a + np_mha(p["attn"], a, a, a, a_mask), p["attn_norm"])
        h2 = np_ln(h1 + np_mha(p["cross_attn"], h1, b, b, b_mask), p["cross_norm"])
        return np_ln(h2 + np_mlp(p["mlp"], h2), p["mlp_norm"])

    np.testing.assert_allclose(x_out, stream(p["x_layer"], x, y, None, y_mask), atol=2e-5)
    np.testing.assert_allclose(y_out, stream(p["y_layer"], y, x, y_mask, None), atol=2e-5)
    # The stacked fusion (with remat) runs the same layer.
    fusion = CoAttentionFusion(dataclasses.replace(cfg, remat=True))
    stacked = {"params": {"layer_0": v["params"]}}
    x2, y2 = jax.jit(fusion.apply)(stacked, x, y, None, y_mask)
    np.testing.assert_allclose(x2, x_out, atol=1e-6)
    np.testing.assert_allclose(y2, y_out, atol=1e-6)


# ------------------------------------------------------------------ heads


def test_attention_pool_matches_clip_recipe():
    x = _rand(2, 2, 3, D)  # [B, h, w, D] feature map
    pool = AttentionPool(num_heads=H, out_features=8, num_positions=7)
    v = random_variables(pool, x, std=0.3)
    p = _np(v)["params"]
    tokens = x.reshape(2, 6, D)
    seq = np.concatenate([tokens.mean(1, keepdims=True), tokens], 1) + p["posemb"]
    ref = np_mha(p["attn"], seq[:, :1], seq, seq)[:, 0]
    np.testing.assert_allclose(jax.jit(pool.apply)(v, x), ref, atol=1e-5)

    # Masked sets (e.g. sentences): masked rows neither enter the mean nor get attended.
    mask = np.array([[1, 1, 1, 0, 0, 0], [1] * 6])
    set_pool = AttentionPool(num_heads=H)
    v = random_variables(set_pool, tokens, mask, std=0.3)
    p = _np(v)["params"]
    out = jax.jit(set_pool.apply)(v, tokens, mask)
    row = tokens[:1, :3]
    seq = np.concatenate([row.mean(1, keepdims=True), row], 1)
    np.testing.assert_allclose(out[0], np_mha(p["attn"], seq[:, :1], seq, seq)[0, 0], atol=1e-5)


def test_mlp_head_mflag_projector_in_train_and_eval_mode():
    """Linear -> BN -> ReLU -> Linear -> BN(no scale/bias), batch statistics in train mode."""
    head = MLPHead((12, 6), final_norm="bn_no_affine")
    x = _rand(8, D)
    v = random_variables(head, x, std=0.3)
    p = _np(v)["params"]
    assert "bn_final" not in p  # no scale, no bias
    y, state = jax.jit(lambda v, x: head.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)

    def bn(h, scale=1.0, bias=0.0):
        return (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * scale + bias

    h = np.maximum(bn(x @ p["fc0"]["kernel"] + p["fc0"]["bias"], **p["bn0"]), 0)
    ref = bn(h @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    np.testing.assert_allclose(y, ref, atol=1e-4)
    h0 = x @ p["fc0"]["kernel"] + p["fc0"]["bias"]
    old = _np(v)["batch_stats"]["bn0"]["mean"]
    np.testing.assert_allclose(
        state["batch_stats"]["bn0"]["mean"], 0.9 * old + 0.1 * h0.mean(0), atol=1e-5
    )
    # Eval mode uses the running statistics.
    y_eval = jax.jit(head.apply)(v, x)
    stats = _np(v)["batch_stats"]

    def running(h, name, scale=1.0, bias=0.0):
        return (h - stats[name]["mean"]) / np.sqrt(stats[name]["var"] + 1e-5) * scale + bias

    h = np.maximum(running(h0, "bn0", **p["bn0"]), 0)
    ref = running(h @ p["fc1"]["kernel"] + p["fc1"]["bias"], "bn_final")
    np.testing.assert_allclose(y_eval, ref, atol=1e-4)


# ------------------------------------------------------------------ prompt hooks


def _const_prompts(tokens, mask=None, values=None):
    def fn(i, hidden, prev):
        if i == 0:
            b = hidden.shape[0]
            t = jnp.broadcast_to(tokens, (b, *tokens.shape))
            v = None if values is None else jnp.broadcast_to(values, (b, *values.shape))
            m = None if mask is None else jnp.broadcast_to(mask, (b, mask.shape[0]))
            return LayerPrompts(t, values=v, mask=m)
        return None

    return fn


@pytest.mark.parametrize("name", ["bert", "clip_text"])  # post-LN; causal pre-LN
def test_zero_attended_prompts_equal_no_prompts(name):
    cfg = tower_config(name, "tiny")
    tower = build_image_tower(cfg) if name == "vit" else build_text_tower(cfg)
    args = tower.example_inputs(2)
    if name != "vit":
        ids = np.random.RandomState(0).randint(3, 90, args[0].shape)
        ids[:, -1] = 99  # an end-of-text token for the causal tower's argmax pooling
        mask = np.ones_like(ids)
        mask[0, -3:] = 0
        args = (jnp.asarray(ids), jnp.asarray(mask))
    v = random_variables(tower, *args, std=0.2)
    width = cfg.width
    prompts = jnp.asarray(_rand(3, width, seed=5)) * 10

    @jax.jit
    def run(v, args):
        plain = tower.apply(v, *args)
        hidden = tower.apply(v, *args, prompt_fn=_const_prompts(prompts, mask=jnp.zeros(3)))
        seen = tower.apply(v, *args, prompt_fn=_const_prompts(prompts))
        return plain, hidden, seen

    plain, hidden, seen = run(v, args)
    for key in ("tokens", "pooled"):
        np.testing.assert_allclose(hidden[key], plain[key], atol=1e-5)
    assert hidden["prompt_tokens"].shape == (2, 3, width)
    assert seen["tokens"].shape == plain["tokens"].shape
    assert np.abs(np.asarray(seen["pooled"]) - np.asarray(plain["pooled"])).max() > 1e-3


def test_qk_v_prompts_match_numpy_and_feed_the_next_layer():
    """K = [W_k qk ; W_k x], V = [W_v v ; W_v x], Q = [W_q qk ; W_q x] in a pre-LN layer;
    the prompt rows' outputs are the next layer's `prev_prompt_out`."""
    stack = TransformerStack(CFG)
    x = _rand(2, 5, D)
    qk, vv = _rand(2, 2, D, seed=1), _rand(2, 2, D, seed=2)

    @jax.jit
    def run(v, x):
        seen = {}

        def fn(i, hidden, prev):
            seen[i] = (hidden, prev)
            return LayerPrompts(jnp.asarray(qk), values=jnp.asarray(vv)) if i == 0 else None

        return stack.apply(v, x, prompt_fn=fn), seen

    v = random_variables(stack, x, std=0.3)
    (tokens, prompt_out), seen = run(v, x)
    p = _np(v)["params"]
    seq = np.concatenate([x[:, :1], qk, x[:, 1:]], 1)
    vals = np.concatenate([x[:, :1], vv, x[:, 1:]], 1)
    out0 = np_pre_ln_layer(p["layer_0"], seq, values=vals)
    np.testing.assert_allclose(seen[1][1], out0[:, 1:3], atol=2e-5)
    np.testing.assert_allclose(seen[1][0], np.delete(out0, [1, 2], axis=1), atol=2e-5)
    out1 = np_pre_ln_layer(p["layer_1"], out0)  # prompts carried on as ordinary tokens
    np.testing.assert_allclose(tokens, np.delete(out1, [1, 2], axis=1), atol=2e-5)
    np.testing.assert_allclose(prompt_out, out1[:, 1:3], atol=2e-5)
    assert seen[0][1] is None


def test_prompts_replace_per_layer_and_scan_rejects_prompt_fn():
    stack = TransformerStack(CFG)
    x = jnp.asarray(_rand(2, 4, D))
    new = jnp.asarray(_rand(2, 3, D, seed=3))

    def fn(i, hidden, prev):
        return LayerPrompts(new[:, : 2 + i])  # 2 rows at layer 0, replaced by 3 at layer 1

    v = random_variables(stack, x, std=0.3)
    tokens, prompt_out = jax.jit(lambda v, x: stack.apply(v, x, prompt_fn=fn))(v, x)
    p = _np(v)["params"]
    out0 = np_pre_ln_layer(p["layer_0"], np.concatenate([x[:, :1], new[:, :2], x[:, 1:]], 1))
    main = np.delete(out0, [1, 2], axis=1)
    out1 = np_pre_ln_layer(p["layer_1"], np.concatenate([main[:, :1], new, main[:, 1:]], 1))
    np.testing.assert_allclose(prompt_out, out1[:, 1:4], atol=2e-5)
    np.testing.assert_allclose(tokens, np.delete(out1, [1, 2, 3], axis=1), atol=2e-5)

    scanned = TransformerStack(TransformerConfig(D, 2, H, 24, scan=True))
    sv = random_variables(scanned, x, std=0.3)
    with pytest.raises(ValueError, match="scan=False"):
        scanned.apply(sv, x, prompt_fn=fn)


def test_prompt_fn_closes_over_the_callers_bound_modules():
    """A method owns prompt params and a projection; the tower calls them through prompt_fn."""

    class Prompted(nn.Module):
        tower: nn.Module

        @nn.compact
        def __call__(self, images):
            width = self.tower.transformer.width
            prompts = self.param("prompts", nn.initializers.normal(1.0), (2, width))
            proj = nn.Dense(width, name="proj")

            def fn(i, hidden, prev):
                if i == 0:
                    return LayerPrompts(
                        jnp.broadcast_to(prompts, (hidden.shape[0], *prompts.shape))
                    )
                return LayerPrompts(proj(prev))  # MCPL-style update from the previous outputs

            return self.tower(images, prompt_fn=fn)

    model = Prompted(build_image_tower(tower_config("vit", "tiny")))
    images = jnp.asarray(_rand(2, 32, 32, 3))
    v = random_variables(model, images, std=0.3)
    assert set(v["params"]) == {"prompts", "proj", "tower"}
    grads = jax.jit(jax.grad(lambda v: model.apply(v, images)["pooled"].sum()))(v)
    for name in ("prompts", "proj"):
        leaves = jax.tree.leaves(nn.meta.unbox(grads["params"][name]))
        assert all(float(jnp.abs(g).max()) > 0 for g in leaves), name
