"""MCPL prompt modules and the 'qk_v' attention against numpy re-derivations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from medvlp_jax.data.tokenize import load_tokenizer
from medvlp_jax.methods.mcpl.keywords import ApTokenizer, load_vocab
from medvlp_jax.methods.mcpl.model import McplModel, PromptOptions
from medvlp_jax.methods.mcpl.prompts import Gpcm, PromptUpdate, RelationHead
from medvlp_jax.models.builders import tower_config
from medvlp_jax.models.testing import random_variables
from medvlp_jax.models.transformer import LayerPrompts, TransformerConfig, TransformerStack

TOL = dict(rtol=1e-4, atol=1e-5)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _dense(p, x):
    return x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])


def _ln(p, x, eps):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _gpcm_np(p, nodes):
    h = _ln(p["norm"], nodes, 1e-5)
    q, k, v = (_dense(p[n], h) for n in ("query", "key", "value"))
    a = _softmax(q @ k.T / np.sqrt(nodes.shape[-1]))
    return a @ v, a


def _update_np(p, prompts, context, mask):
    q, k, v = _dense(p["query"], prompts), _dense(p["key"], context), _dense(p["value"], context)
    logits = np.einsum("bnd,bsd->bns", q, k) / np.sqrt(prompts.shape[-1])
    logits = np.where(mask[:, None, :] > 0, logits, -np.inf)
    return _softmax(logits) @ v + prompts


def _relation_np(p, prompts, keys, mask):
    logits = np.einsum("bnd,bsd->bns", _dense(p["query"], prompts), _dense(p["key"], keys))
    return mask[:, None, :] / (1 + np.exp(-logits))


def test_gpcm_matches_numpy():
    rng = np.random.default_rng(0)
    nodes = rng.normal(size=(4, 24)).astype(np.float32)
    module = Gpcm()
    variables = random_variables(module, nodes, std=0.3)
    y, a = module.apply(variables, nodes)
    y_ref, a_ref = _gpcm_np(variables["params"], nodes)
    assert variables["params"]["query"]["kernel"].shape == (24, 6)  # D -> D/4
    np.testing.assert_allclose(a, a_ref, **TOL)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(np.asarray(a).sum(-1), 1.0, rtol=1e-5)


def test_prompt_update_and_relation_match_numpy():
    rng = np.random.default_rng(1)
    prompts = rng.normal(size=(3, 2, 16)).astype(np.float32)
    context = rng.normal(size=(3, 9, 16)).astype(np.float32)
    mask = (rng.random((3, 9)) < 0.7).astype(np.int32)
    mask[:, 0] = 1
    update = PromptUpdate()
    variables = random_variables(update, prompts, context, mask, std=0.3)
    z = update.apply(variables, prompts, context, mask)
    np.testing.assert_allclose(z, _update_np(variables["params"], prompts, context, mask), **TOL)
    # masked context rows have no influence
    shuffled = np.where(mask[..., None] > 0, context, 100.0 * rng.normal(size=context.shape))
    np.testing.assert_allclose(update.apply(variables, prompts, shuffled, mask), z, **TOL)

    relation = RelationHead(dim=8)
    rel_vars = random_variables(relation, prompts, context, mask, std=0.3)
    r = relation.apply(rel_vars, prompts, context, mask)
    np.testing.assert_allclose(r, _relation_np(rel_vars["params"], prompts, context, mask), **TOL)


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _mha_np(p, q_in, kv_in, v_in, mask):
    """Multi-head attention with kernels [D, H, K] / out [H, K, D]; mask [B, S] keys."""
    q = np.einsum("btd,dhk->bthk", q_in, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("btd,dhk->bthk", kv_in, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("btd,dhk->bthk", v_in, p["value"]["kernel"]) + p["value"]["bias"]
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
    o = np.einsum("bhts,bshk->bthk", _softmax(logits), v)
    return np.einsum("bthk,hkd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("norm_first", [True, False])
def test_qk_v_attention_matches_numpy(norm_first):
    """One layer with AP rows in query/key and prompt rows in value (model.py's equations):
    Q = [x_0; AP; x_1..] Wq, K = [x_0; AP; x_1..] Wk, V = [x_0; Z; x_1..] Wv."""
    cfg = TransformerConfig(width=16, num_layers=1, num_heads=2, mlp_dim=32, norm_first=norm_first)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    ap = rng.normal(size=(2, 2, 16)).astype(np.float32)
    z = rng.normal(size=(2, 2, 16)).astype(np.float32)
    mask = np.ones((2, 5), np.int32)
    mask[1, -1] = 0
    stack = TransformerStack(cfg)
    prompt_fn = lambda i, h, prev: LayerPrompts(jnp.asarray(ap), values=jnp.asarray(z))
    variables = random_variables(stack, x, mask, prompt_fn=prompt_fn, std=0.3)
    tokens, prompt_out = stack.apply(variables, x, mask, prompt_fn=prompt_fn)

    p = jax.tree.map(np.asarray, variables["params"]["layer_0"])
    eps = cfg.layer_norm_eps
    seq = np.concatenate([x[:, :1], ap, x[:, 1:]], 1)
    vseq = np.concatenate([x[:, :1], z, x[:, 1:]], 1)
    full_mask = np.concatenate([mask[:, :1], np.ones((2, 2)), mask[:, 1:]], 1)
    mlp = lambda h: _dense(p["mlp"]["fc2"], _gelu(_dense(p["mlp"]["fc1"], h)))
    if norm_first:
        h, hv = _ln(p["attn_norm"], seq, eps), _ln(p["attn_norm"], vseq, eps)
        y = seq + _mha_np(p["attn"], h, h, hv, full_mask)
        y = y + mlp(_ln(p["mlp_norm"], y, eps))
    else:
        y = _ln(p["attn_norm"], seq + _mha_np(p["attn"], seq, seq, vseq, full_mask), eps)
        y = _ln(p["mlp_norm"], y + mlp(y), eps)
    np.testing.assert_allclose(tokens, np.concatenate([y[:, :1], y[:, 3:]], 1), **TOL)
    np.testing.assert_allclose(prompt_out, y[:, 1:3], **TOL)


@pytest.fixture(scope="module")
def ap_tokens():
    return ApTokenizer.create(load_tokenizer(""), load_vocab(), 8)


def _model(ap_tokens, **options):
    image, text = tower_config("vit", "tiny"), tower_config("bert", "tiny")
    text.update(vocab_size=30522, width=24, num_heads=4)  # D_text 24 != D_vis 32
    return McplModel(
        ml_collections.FrozenConfigDict(image),
        ml_collections.FrozenConfigDict(text),
        16,
        "mean",
        PromptOptions(prompt_depth=2, relation_dim=8, keyword_hidden=0, **options),
        ap_tokens,
    )


def _inputs(ap_tokens, b=2):
    rng = np.random.default_rng(3)
    hot = (rng.random((b, 119)) < 0.1).astype(np.float32)
    ap_ids, ap_mask = ap_tokens.sequences(jnp.asarray(hot))
    images = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(1000, 2000, (b, 6)).astype(np.int32)
    return images, ids, np.ones((b, 6), np.int32), ap_ids, ap_mask


def _masked_mean(x, m):
    return (x * m[..., None]).sum(1) / m.sum(1, keepdims=True)


@pytest.mark.parametrize("config", ["qk_v", "splice"])
def test_prompt_wiring_matches_numpy(ap_tokens, config):
    """GPCM -> prompt update -> (AP in query/key, prompts in value | spliced), per layer."""
    model = _model(ap_tokens, prompt_config=config)
    inputs = _inputs(ap_tokens)
    variables = random_variables(model, *inputs, std=0.3)
    p = jax.tree.map(np.asarray, variables["params"])
    rng = np.random.default_rng(4)
    b, n, dt, dv, length = 2, 2, 24, 32, ap_tokens.length
    states = [rng.normal(size=(b, 2, length, dv)).astype(np.float32) for _ in range(2)]
    ap_mask = np.asarray(inputs[4])
    hidden = rng.normal(size=(b, 5, dv)).astype(np.float32)
    prev = rng.normal(size=(b, 4 if config == "splice" else 2, dv)).astype(np.float32)

    @jax.jit
    def run(variables, states, ap_mask, hidden, prev):
        bound = model.bind(variables)
        texts, images = bound._base_prompts()
        relations = []
        fn = bound._prompt_fn("image", images, states, ap_mask, relations)
        out0, out1 = fn(0, hidden, None), fn(1, hidden, prev)
        assert fn(2, hidden, prev) is None  # past the prompt depth
        return texts, images, (out0.tokens, out0.values), (out1.tokens, out1.values), relations

    texts, images, first, out, relations = run(variables, states, ap_mask, hidden, prev)
    y, _ = _gpcm_np(p["gpcm_1"], np.concatenate([p["text_prompts"][1], p["image_prompts"][1]]))
    np.testing.assert_allclose(texts[1], y[:n, :dt], **TOL)
    np.testing.assert_allclose(images[1], y[n:, :dv], **TOL)
    np.testing.assert_allclose(images[0], p["image_prompts"][0, :, :dv], **TOL)  # no GPCM at 0

    a, pa = states[1][:, 0], states[1][:, 1]
    ap = p["ap_shared"][1, :dv] + np.stack(
        [_masked_mean(a, ap_mask[:, 0]), _masked_mean(pa, ap_mask[:, 1])], 1
    )
    keys = np.concatenate([a, pa], 1)
    key_mask = np.concatenate([ap_mask[:, 0], ap_mask[:, 1]], 1)
    context = np.concatenate([keys, prev], 1)
    context_mask = np.concatenate([key_mask, np.ones(prev.shape[:2])], 1)
    base1 = np.broadcast_to(np.asarray(images[1]), (b, n, dv))
    z = _update_np(p["image_update_1"], base1, context, context_mask)
    if config == "qk_v":  # AP tokens in query/key, updated prompts in value
        np.testing.assert_allclose(out[0], ap, **TOL)
        np.testing.assert_allclose(out[1], z, **TOL)
    else:
        assert out[1] is None
        np.testing.assert_allclose(out[0], np.concatenate([z, ap], 1), **TOL)
    r = _relation_np(p["image_relation_1"], z, keys, key_mask)
    np.testing.assert_allclose(relations[0], r, **TOL)
    prompts0 = first[1] if config == "qk_v" else first[0][:, :n]  # layer 0: context, no update
    np.testing.assert_allclose(prompts0, np.broadcast_to(np.asarray(images[0]), (b, n, dv)), **TOL)
