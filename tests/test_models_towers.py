"""Tower builders, logical axes, remat/scan/bf16 options and positional-embedding resizing."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medvlp_jax.models import (
    AttentionPool,
    CoAttentionFusion,
    MLMHead,
    MLPHead,
    TransformerConfig,
    TransformerStack,
    build_image_tower,
    build_text_tower,
    export_hf,
    load_hf_params,
    resize_posemb,
    tower_config,
)
from medvlp_jax.models.testing import fast_compile, random_variables

LOGICAL_AXES = {"vocab", "embed", "mlp", "heads", "kv", "position", "proj", "conv_in", "conv_out"}
LOGICAL_AXES |= {"layers", None}


@pytest.fixture(autouse=True)
def _fast_compile():
    with fast_compile():
        yield


def _build(name: str, size: str = "tiny", **overrides):
    cfg = tower_config(name, size)
    cfg.update(overrides)
    return build_image_tower(cfg) if name in ("vit", "resnet50") else build_text_tower(cfg)


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "vit",
            {
                "tokens": (2, 17, 32),
                "normed_tokens": (2, 17, 32),
                "pooled": (2, 16),
                "pooler_output": (2, 32),
                "pyramid": ((2, 4, 4, 32),),
            },
        ),
        (
            "resnet50",
            {
                "tokens": (2, 4, 2048),
                "pooled": (2, 2048),
                "feature_map": (2, 2, 2, 2048),
                "pyramid": ((2, 16, 16, 256), (2, 8, 8, 512), (2, 4, 4, 1024), (2, 2, 2, 2048)),
            },
        ),
        ("bert", {"tokens": (2, 8, 32), "pooled": (2, 32), "pooler_output": (2, 32)}),
        ("roberta", {"tokens": (2, 8, 32), "pooled": (2, 32), "pooler_output": (2, 32)}),
        ("clip_text", {"tokens": (2, 16, 32), "pooled": (2, 16), "pooler_output": (2, 32)}),
    ],
)
def test_built_towers_follow_the_output_contract(name, expected):
    tower = _build(name)
    args = tower.example_inputs(2)
    abstract = jax.eval_shape(lambda: tower.init(jax.random.key(0), *args))
    out = jax.eval_shape(lambda v: tower.apply(v, *args), abstract)
    shape = lambda v: tuple(m.shape for m in v) if isinstance(v, tuple) else v.shape
    assert {k: shape(v) for k, v in out.items()} == expected

    # Every parameter carries one logical axis name per dimension, from the documented set.
    boxes = jax.tree.leaves(abstract["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for box in boxes:
        assert isinstance(box, nn.LogicallyPartitioned), box
        assert len(box.names) == box.value.ndim and set(box.names) <= LOGICAL_AXES, box.names


def test_heads_and_fusion_params_are_annotated():
    cfg = TransformerConfig(16, 2, 2, 24, norm_first=False, scan=False)
    x, y = jnp.zeros((2, 3, 16)), jnp.zeros((2, 4, 16))
    for module, args in [
        (MLPHead((8, 4), final_norm="bn"), (x[:, 0],)),
        (AttentionPool(2, 8, num_positions=4), (x,)),
        (CoAttentionFusion(cfg), (x, y)),
        (MLMHead(50), (x,)),
    ]:
        abstract = jax.eval_shape(lambda m=module, a=args: m.init(jax.random.key(0), *a))
        for box in jax.tree.leaves(
            abstract["params"], is_leaf=lambda b: isinstance(b, nn.Partitioned)
        ):
            assert isinstance(box, nn.LogicallyPartitioned)
            assert set(box.names) <= LOGICAL_AXES


def test_builder_rejects_unknown_fields_and_names():
    cfg = tower_config("bert", "tiny")
    cfg.hidden_size = 64  # HF spelling, not ours
    with pytest.raises(ValueError, match=r"hidden_size.*valid fields"):
        build_text_tower(cfg)
    with pytest.raises(ValueError, match="tower name 'gpt2'"):
        build_text_tower(ml_collections.ConfigDict({"name": "gpt2"}))
    with pytest.raises(ValueError, match="tower name 'bert'"):
        build_image_tower(tower_config("bert", "tiny"))
    with pytest.raises(ValueError, match="activation 'swish'"):
        _build("vit", activation="swish")


def test_scan_and_remat_give_the_same_values_and_gradients():
    cfg = TransformerConfig(16, 2, 2, 24, norm_first=False)
    plain = TransformerStack(cfg)
    scanned = TransformerStack(dataclasses.replace(cfg, scan=True, remat=True))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 16), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1] * 5])
    v = random_variables(plain, x, mask, std=0.2)
    stack = lambda tree: jax.tree.map(lambda *xs: np.stack(xs), tree["layer_0"], tree["layer_1"])
    sv = {"params": {"layers": stack(v["params"])}}

    def loss(module, v):
        tokens, _ = module.apply(v, x, mask)
        return jnp.sum(tokens**2)

    l1, g1 = jax.jit(jax.value_and_grad(lambda v: loss(plain, v)))(v)
    l2, g2 = jax.jit(jax.value_and_grad(lambda v: loss(scanned, v)))(sv)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
        stack(g1["params"]),
        g2["params"]["layers"],
    )


def test_bfloat16_compute_with_float32_params():
    f32 = _build("vit")
    bf16 = _build("vit", dtype="bfloat16")
    (images,) = f32.example_inputs(2)
    images = jnp.asarray(np.random.RandomState(0).randn(*images.shape), jnp.float32)
    v = random_variables(f32, images, std=0.2)
    abstract = jax.eval_shape(lambda: bf16.init(jax.random.key(0), images))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(abstract)))
    ref = jax.jit(f32.apply)(v, images)["pooled"]
    out = jax.jit(bf16.apply)(v, images)["pooled"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), ref, atol=0.05 * float(jnp.abs(ref).max())
    )


def test_posemb_resize_keeps_prefix_identity_and_constants():
    table = jnp.asarray(np.random.RandomState(0).randn(1 + 16, 8), jnp.float32)
    np.testing.assert_array_equal(resize_posemb(table, (4, 4)), table)
    const = jnp.concatenate([table[:1], jnp.full((16, 8), 0.7)])
    out = resize_posemb(const, (6, 5))
    assert out.shape == (31, 8)
    np.testing.assert_array_equal(out[0], table[0])
    np.testing.assert_allclose(out[1:], 0.7, atol=1e-6)


def test_vit_other_image_size_at_import_and_at_run_time(tmp_path):
    """A checkpoint for 32 px loaded into a 48 px module (grid resized on import) equals the
    32 px module run on 48 px images (grid resized on the fly)."""
    small = _build("vit", layout="hf", activation="gelu", proj_dim=0)
    v = random_variables(small, *small.example_inputs(1), std=0.2)
    export_hf(small, v, tmp_path / "vit32")
    big = _build("vit", layout="hf", activation="gelu", proj_dim=0, image_size=48)
    big_vars = load_hf_params(tmp_path / "vit32", big)
    assert big_vars["params"]["posemb"].shape == (1 + 36, 32)
    images = jnp.asarray(np.random.RandomState(1).randn(2, 48, 48, 3), jnp.float32)
    a = jax.jit(big.apply)(big_vars, images)
    b = jax.jit(small.apply)(v, images)
    np.testing.assert_allclose(a["tokens"], b["tokens"], atol=1e-5)
    # A one-channel module gets the RGB patch kernel summed over channels.
    grey = _build("vit", layout="hf", activation="gelu", proj_dim=0, channels=1)
    kernel = load_hf_params(tmp_path / "vit32", grey)["params"]["patch_embed"]["kernel"]
    np.testing.assert_allclose(kernel[..., 0, :], v["params"]["patch_embed"]["kernel"].sum(2))


def test_vit_resnet_stem_is_the_resnet_trunk_through_layer3():
    tower = _build("vit", stem="resnet", patch_size=16)  # 32 px: a 2 x 2 token grid
    images = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    variables = random_variables(tower, images)
    stem, stats = variables["params"]["patch_embed"], variables["batch_stats"]["patch_embed"]
    assert set(stem["trunk"]) >= {"conv1", "bn1", "layer3_5"} and "layer4_0" not in stem["trunk"]
    assert tower.apply(variables, images)["tokens"].shape == (4, 5, 32)

    # The stem = the standalone trunk (stride 16, 1024 channels) + a 1x1 conv to width, in
    # eval mode (running statistics) and in train mode (batch statistics, updated).
    trunk = build_image_tower(tower_config("resnet50")).clone(num_stages=3)
    trunk_vars = {"params": stem["trunk"], "batch_stats": stats["trunk"]}
    proj = stem["proj"]
    for train in (False, True):
        out = trunk.apply(
            trunk_vars, images, train=train, mutable=["batch_stats"] if train else False
        )
        fmap = out[0]["feature_map"] if train else out["feature_map"]
        assert fmap.shape == (4, 2, 2, 1024)
        tokens = np.einsum("bhwc,cd->bhwd", fmap, proj["kernel"][0, 0]) + proj["bias"]
        got = tower.apply(
            variables,
            images,
            method=lambda m, x, t=train: m.patch_embed(x, t)[0],
            mutable=["batch_stats"] if train else False,
        )
        got = got[0] if train else got
        np.testing.assert_allclose(got, tokens, rtol=1e-4, atol=1e-4)
    _, updated = tower.apply(variables, images, train=True, mutable=["batch_stats"])
    assert not np.allclose(
        updated["batch_stats"]["patch_embed"]["trunk"]["bn1"]["mean"], stats["trunk"]["bn1"]["mean"]
    )

    with pytest.raises(ValueError, match="stem 'pixel' is not one of"):
        random_variables(_build("vit", stem="pixel"), images)
    with pytest.raises(ValueError, match="stem 'resnet' needs patch_size 16"):
        random_variables(_build("vit", stem="resnet", patch_size=8), images)
    with pytest.raises(ValueError, match=r"num_stages=5; expected 1\.\.4"):
        random_variables(trunk.clone(num_stages=5), images)
