"""configs/mcpl.py:original: each released-code switch against an independent re-derivation of
the released module (CUHK-AIM-Group/MCPL `mcpl.py`, `clip/model.py`), the preset's fields, the
released optimiser, and a tiny end-to-end run."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medvlp_jax import config as config_lib
from medvlp_jax import optim, train
from medvlp_jax.data.tokenize import load_tokenizer
from medvlp_jax.methods.mcpl.keywords import ApTokenizer, load_vocab
from medvlp_jax.methods.mcpl.method import default_model_config
from medvlp_jax.methods.mcpl.model import McplModel, PromptOptions
from medvlp_jax.methods.mcpl.prompts import Gpcm, PromptUpdate, RelationHead
from medvlp_jax.models.builders import tower_config
from medvlp_jax.models.testing import random_variables

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-4, atol=1e-5)


def _preset_module():
    spec = importlib.util.spec_from_file_location("mcpl_config", ROOT / "configs/mcpl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ORIGINAL = _preset_module().ORIGINAL


# ------------------------------------------------------------ the released modules in numpy


def _linear(p, x):
    """torch nn.Linear(bias=False) as our Dense kernel [in, out]; a bias would be a bug."""
    assert set(p) == {"kernel"}
    return x @ np.asarray(p["kernel"])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _layer_norm(p, x, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def released_msa(p, nodes):
    """mcpl.py MHAttention on [N, D] nodes: LN, q/k D -> D/4, v D -> D, scale 1/sqrt(D)."""
    x = _layer_norm(p["norm"], nodes)
    q, k, v = (_linear(p[n], x) for n in ("query", "key", "value"))
    return _softmax(q @ k.T / np.sqrt(nodes.shape[-1])) @ v


def released_cross_att(p, x, y):
    """clip/model.py CrossAttention: softmax(q(x) k(y)^T / sqrt(D)) v(y) + x, no mask."""
    q, k = _linear(p["query"], x), _linear(p["key"], y)
    logits = np.einsum("bnd,bsd->bns", q, k) / np.sqrt(x.shape[-1])
    return _softmax(logits) @ _linear(p["value"], y) + x


def released_cross_rlt(p, x, y):
    """clip/model.py CrossAttention2: sigmoid(q(x) k(y)^T), no scale, no mask."""
    logits = np.einsum("bnd,bsd->bns", _linear(p["query"], x), _linear(p["key"], y))
    return 1 / (1 + np.exp(-logits))


def test_bias_free_quarter_width_modules_match_the_released_ones():
    rng = np.random.default_rng(0)
    nodes = rng.normal(size=(32, 24)).astype(np.float32)  # 16 text + 16 image nodes
    gpcm = Gpcm(use_bias=False)
    v = random_variables(gpcm, nodes, std=0.3)
    np.testing.assert_allclose(gpcm.apply(v, nodes)[0], released_msa(v["params"], nodes), **TOL)

    prompts = rng.normal(size=(3, 2, 24)).astype(np.float32)
    context = rng.normal(size=(3, 9, 24)).astype(np.float32)
    update = PromptUpdate(qk_divisor=4, use_bias=False)
    v = random_variables(update, prompts, context, None, std=0.3)
    assert v["params"]["query"]["kernel"].shape == (24, 6)  # D -> D/4
    got = update.apply(v, prompts, context, None)
    np.testing.assert_allclose(got, released_cross_att(v["params"], prompts, context), **TOL)

    relation = RelationHead(dim=0, use_bias=False)
    v = random_variables(relation, prompts, context, None, std=0.3)
    assert v["params"]["key"]["kernel"].shape == (24, 6)  # dim 0: D/4
    got = relation.apply(v, prompts, context, None)
    np.testing.assert_allclose(got, released_cross_rlt(v["params"], prompts, context), **TOL)


# ------------------------------------------------------------ the model with the switches on


@pytest.fixture(scope="module")
def ap_tokens():
    return ApTokenizer.create(load_tokenizer(""), load_vocab(), 8)


def _original(**changes) -> PromptOptions:
    return PromptOptions(**{"prompt_depth": 2, "keyword_hidden": 0, **ORIGINAL, **changes})


def _model(ap_tokens, options: PromptOptions) -> McplModel:
    image, text = tower_config("vit", "tiny"), tower_config("bert", "tiny")
    text.update(vocab_size=30522, width=24, num_heads=4)  # D_text 24 != D_vis 32
    frozen = ml_collections.FrozenConfigDict
    return McplModel(frozen(image), frozen(text), 16, "mean", options, ap_tokens)


def _inputs(ap_tokens, b=2, t=8):
    rng = np.random.default_rng(3)
    hot = (rng.random((b, 119)) < 0.05).astype(np.float32)
    ap_ids, ap_mask = ap_tokens.sequences(jnp.asarray(hot))
    images = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(1000, 2000, (b, t)).astype(np.int32)
    return images, ids, np.ones((b, t), np.int32), ap_ids, ap_mask


def test_prompt_wiring_matches_the_released_code(ap_tokens):
    """Layer 0: free context rows (image: through ln_pre); layer 1: GPCM over 16 + 16 nodes
    read at rows 0:2 / 2:4, update and relation over every keyword position, separate
    anatomy / pathology vectors plus the mean over all L positions."""
    model = _model(ap_tokens, _original())
    inputs = _inputs(ap_tokens)
    variables = random_variables(model, *inputs, std=0.3)
    p = jax.tree.map(np.asarray, variables["params"])
    rng = np.random.default_rng(4)
    b, dt, dv, length = 2, 24, 32, ap_tokens.length
    states = {
        side: [rng.normal(size=(b, 2, length, d)).astype(np.float32) for _ in range(2)]
        for side, d in (("text", dt), ("image", dv))
    }
    ap_mask = np.asarray(inputs[4])
    assert (ap_mask == 0).any()  # there is padding to ignore

    @jax.jit
    def run(variables, states, ap_mask):
        bound = model.bind(variables)
        texts, images = bound._base_prompts()
        out = {}
        for side, base, d in (("text", texts, dt), ("image", images, dv)):
            hidden, prev = jnp.ones((b, 5, d)), jnp.full((b, 4, d), 0.5)
            relations = []
            # text: layer 0's rows as written over the report (the next test places them)
            placed = side == "image"
            fn = bound._prompt_fn(side, base, states[side], ap_mask, relations, placed=placed)
            out[side] = (fn(0, hidden, None).tokens, fn(1, hidden, prev).tokens, relations[0])
        return texts, images, out

    texts, images, out = run(variables, states, ap_mask)
    y = released_msa(p["gpcm_1"], np.concatenate([p["text_prompts"][0], p["image_prompts"][0]]))
    np.testing.assert_allclose(texts[1], y[0:2, :dt], **TOL)
    np.testing.assert_allclose(images[1], y[2:4, :dv], **TOL)
    image_ln_pre = p["backbone"]["image"]["ln_pre"]
    first = {"text": p["text_context"], "image": _layer_norm(image_ln_pre, p["image_context"])}
    for side, base, d in (("text", texts, dt), ("image", images, dv)):
        np.testing.assert_allclose(out[side][0], np.broadcast_to(first[side], (b, 4, d)), **TOL)
        a, pa = states[side][1][:, 0], states[side][1][:, 1]
        prev = np.full((b, 4, d), 0.5, np.float32)
        keys = np.concatenate([a, pa], 1)
        prompts = np.broadcast_to(np.asarray(base[1]), (b, 2, d))
        z = released_cross_att(p[f"{side}_update_1"], prompts, np.concatenate([keys, prev], 1))
        anatomy = p["ap_shared"][0, 0, :d] + a.mean(1)  # AvgPool1d over every position
        pathology = p["ap_shared"][0, 1, :d] + pa.mean(1)
        want = np.concatenate([z, anatomy[:, None], pathology[:, None]], 1)
        np.testing.assert_allclose(out[side][1], want, **TOL)
        r = released_cross_rlt(p[f"{side}_relation_1"], z, keys)
        np.testing.assert_allclose(out[side][2], r, **TOL)


def test_layer0_rows_overwrite_report_tokens_and_join_the_patches_before_ln_pre(ap_tokens):
    """Against the towers run on the released layout directly: text [x_0 ; C ; x_5..] with C
    in place of report tokens 1-4 (their positions' embeddings), image [cls ; patches ; C]
    before ln_pre. Pooling skips the prompt rows as ours always does."""
    model = _model(ap_tokens, _original(prompt_depth=1))
    inputs = _inputs(ap_tokens)
    variables = random_variables(model, *inputs, std=0.3)
    images, ids, mask, ap_ids, ap_mask = inputs

    def embeddings(bound):
        return (
            bound.embed_texts(ids, mask, ap_ids, ap_mask)[0],
            bound.embed_images(images, ap_ids, ap_mask)[0],
        )

    def released(bound):
        tower, backbone = bound.backbone.text, bound.backbone
        context = jnp.broadcast_to(bound.text_context, (2, 4, 24))
        embeds = tower.embed_tokens(ids).at[:, 1:5].set(context)
        tokens = tower(ids, mask, inputs_embeds=embeds)["tokens"]
        pooled = jnp.concatenate([tokens[:, :1], tokens[:, 5:]], 1).mean(1)
        patches = backbone.image.embed(images)
        with_context = jnp.concatenate(
            [patches, jnp.broadcast_to(bound.image_context, (2, 4, 32))], 1
        )
        image = backbone.image.encode(with_context)["pooled"]
        return backbone.text_proj(pooled), backbone.image_proj(image)

    got = jax.jit(lambda v: model.apply(v, method=embeddings))(variables)
    want = jax.jit(lambda v: model.apply(v, method=released))(variables)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize("padding_mask", [True, False])
def test_ap_padding_mask_decides_whether_padding_reaches_the_keyword_states(
    ap_tokens, padding_mask
):
    model = _model(ap_tokens, _original(ap_padding_mask=padding_mask))
    inputs = _inputs(ap_tokens)
    variables = random_variables(model, *inputs, std=0.3)
    ap_ids, ap_mask = inputs[3], inputs[4]

    @jax.jit
    def states(variables, mask):
        bound = model.bind(variables)
        return bound._ap_states("text", ap_ids, mask), bound._ap_states("image", ap_ids, mask)

    real, all_on = states(variables, ap_mask), states(variables, jnp.ones_like(ap_mask))
    same = all(np.allclose(x, y) for x, y in zip(*map(jax.tree.leaves, (real, all_on))))
    assert same != padding_mask


# ------------------------------------------------------------ the switches as config


def _leaves(config) -> dict:
    return {k: config_lib.lookup(config, k) for k in config_lib.leaf_paths(config)}


def test_original_preset_changes_exactly_the_documented_fields():
    tiny = config_lib.load_config_file(str(ROOT / "configs/mcpl.py:tiny"))
    original = config_lib.load_config_file(str(ROOT / "configs/mcpl.py:tiny,original"))
    a, b = _leaves(tiny), _leaves(original)
    changed = {k for k in a if a[k] != b[k]}
    optim_fields = {"name", "warmup_init_lr", "end_lr", "warmup_steps", "no_decay"}
    assert changed == (
        {f"model.{k}" for k in ORIGINAL}
        | {"model.ap_max_len"}
        | {f"optim.{k}" for k in optim_fields | {"clip_grad_norm"}}
        | {"bench.variants"}  # `bench quality` runs the preset itself, not the ablations
    )
    assert b["bench.variants"] == ()
    defaults = default_model_config()
    assert all(b[f"model.{k}"] != defaults[k] for k in ORIGINAL)
    assert b["model.ap_max_len"] == b["data.max_text_len"]
    assert (b["optim.name"], b["optim.momentum"], b["optim.lr"]) == ("sgd", 0.9, 2e-3)
    PromptOptions.from_config(original.model)  # a valid combination


# What each switch governs in the parameter tree, beyond the values themselves.
SWITCH_PARAMS = {
    "prompt_config": set(),
    "prompt_bias": {"gpcm_1", "text_update_1", "image_update_1"}
    | {"text_relation_1", "image_relation_1"},
    "update_qk_divisor": {"text_update_1", "image_update_1"},
    "relation_dim": {"text_relation_1", "image_relation_1"},
    "gpcm_nodes": {"text_prompts", "image_prompts"},
    "separate_ap_params": {"ap_shared"},
    "ap_padding_mask": set(),
    "layer0_context": {"text_context", "image_context", "text_prompts", "image_prompts"}
    | {"ap_shared"},
    "layer0_in_input": set(),
}


def _param_shapes(ap_tokens, options) -> dict:
    model = _model(ap_tokens, options)
    inputs = _inputs(ap_tokens)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]
    return {k: jax.tree.map(lambda x: x.shape, v) for k, v in tree.items()}


def test_switching_one_flag_back_changes_only_what_it_names(ap_tokens):
    assert set(SWITCH_PARAMS) == set(ORIGINAL)
    defaults = PromptOptions()
    original = _param_shapes(ap_tokens, _original())
    for name in ORIGINAL:
        if name == "prompt_config":
            continue  # 'qk_v' needs both layer-0 switches off (checked below)
        shapes = _param_shapes(ap_tokens, _original(**{name: getattr(defaults, name)}))
        changed = {k for k in set(shapes) | set(original) if shapes.get(k) != original.get(k)}
        assert changed == SWITCH_PARAMS[name], name


BAD = [
    ({"update_qk_divisor": 0}, r"update_qk_divisor=0: must be >= 1"),
    ({"relation_dim": -1}, r"relation_dim=-1: must be >= 0"),
    ({"gpcm_nodes": 1}, r"gpcm_nodes=1: must be 0 or >= num_prompts"),
    ({"prompt_bias": "no"}, r"prompt_bias='no'; expected True or False"),
    ({"layer0_in_input": 1}, r"layer0_in_input=1; expected True or False"),
    ({"prompt_config": "qk_v"}, r"layer0_context=True: needs .*prompt_config='splice'"),
]


@pytest.mark.parametrize("changes, match", BAD)
def test_bad_values_name_the_field(changes, match):
    with pytest.raises(ValueError, match=rf"config\.model\.{match}"):
        _original(**changes).check_switches()


def test_switches_without_their_module_are_refused():
    for field in ("separate_ap_params", "ap_padding_mask", "update_qk_divisor"):
        opts = PromptOptions(ap_prompt=False, prompt_config="splice", **{field: ORIGINAL[field]})
        with pytest.raises(ValueError, match=rf"config\.model\.{field}=.*AP prompt"):
            opts.check_switches()
    with pytest.raises(ValueError, match=r"config\.model\.gpcm_nodes.*GPCM"):
        _original(gpcm=False).check_switches()


def test_unknown_preset_names_the_file_and_the_presets():
    with pytest.raises(ValueError, match=r"configs/mcpl\.py.*'tiny', 'base', 'original'"):
        config_lib.load_config_file(str(ROOT / "configs/mcpl.py:tiny,orignal"))
    with pytest.raises(ValueError, match="exclude each other"):
        config_lib.load_config_file(str(ROOT / "configs/mcpl.py:tiny,base"))


# ------------------------------------------------------------ the released optimiser


def released_lr(step: int, total: int, max_lr=2e-3, min_lr=5e-6) -> float:
    """CosineAnnealingWarmupRestarts (first cycle) at `step`, warm-up int(0.1 total)."""
    warmup = int(total * 0.1)
    if step < warmup:
        return (max_lr - min_lr) * step / warmup + min_lr
    t = (step - warmup) / (total - warmup)
    return min_lr + (max_lr - min_lr) * (1 + np.cos(np.pi * t)) / 2


def test_released_sgd_schedule_and_decay_on_every_parameter():
    config = config_lib.load_config_file(str(ROOT / "configs/mcpl.py:original"))
    config.train.num_steps = 40  # the warm-up follows (a reference to 10% of it)
    assert config.optim.warmup_steps == 4
    params = {"w": np.full((3,), 2.0, np.float32), "norm": {"bias": np.ones(2, np.float32)}}
    tx, lr_fn = optim.build(config.optim, params, optim.group_rules(config.optim, ()), 40)
    for step in (0, 2, 4, 17, 39):
        np.testing.assert_allclose(float(lr_fn(step)), released_lr(step, 40), rtol=1e-5)
    grads = jax.tree.map(lambda x: np.full_like(x, 0.5), params)
    state, trace, p = tx.init(params), None, params
    for step in range(2):  # torch SGD: buf = m buf + (g + wd p); p -= lr buf
        updates, state = tx.update(grads, state, p)
        g = jax.tree.map(lambda x, gi: gi + 0.05 * x, p, grads)
        trace = g if trace is None else jax.tree.map(lambda t, gi: 0.9 * t + gi, trace, g)
        want = jax.tree.map(lambda x, t, s=step: x - released_lr(s, 40) * t, p, trace)
        p = optax.apply_updates(p, updates)
        for got, ref in zip(jax.tree.leaves(p), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-6)


# ------------------------------------------------------------ end to end


def test_tiny_original_trains_end_to_end(tmp_path):
    """configs/mcpl.py:tiny,original on a random backbone (no pre-training): two SGD steps."""
    config = config_lib.load_config_file(str(ROOT / "configs/mcpl.py:tiny,original"))
    evals = [f"evals.{name}.enabled=false" for name in ("zero_shot", "retrieval", "linear_probe")]
    config = config_lib.apply_overrides(
        config,
        [
            "init.backbone.source=",
            "train.checkpoint_every=2",
            f"data.cache_dir={tmp_path / 'cache'}",
            *evals,
        ],
    )
    (tmp_path / "run").mkdir()
    train.run(config, tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [row["train/loss"] for row in logged if "train/loss" in row]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
