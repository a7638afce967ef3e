"""Numerical parity of imported checkpoints with the PyTorch reference models (fp32, eval).

Tiny random transformers / torchvision models are saved to tmp_path, loaded with our
importers, and compared on the same inputs; then exported back and reloaded by transformers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medvlp_jax.models import (  # noqa: E402
    export_hf,
    export_torchvision_resnet50,
    load_hf,
    load_hf_params,
    load_torchvision_resnet50,
)
from medvlp_jax.models.testing import fast_compile  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True)
def _fast_compile():
    with fast_compile():
        yield


TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=40,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _text_inputs(pad_id: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 90, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[0, 6:] = 0
    ids[0, 6:] = pad_id
    return ids, mask


def _images(channels: int = 3, size: int = 32, seed: int = 0):
    return np.random.RandomState(seed).randn(2, size, size, channels).astype(np.float32)


def _torch_images(x):
    return torch.tensor(x).permute(0, 3, 1, 2)


def _save(model, path):
    torch.manual_seed(0)
    model.eval()
    model.save_pretrained(path)
    return model


def _check(outputs: dict, ours: dict, pairs: dict[str, str]) -> dict[str, float]:
    diffs = {k: _max_diff(getattr(outputs, hf), ours[k]) for k, hf in pairs.items()}
    assert max(diffs.values()) < TOL, diffs
    return diffs


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bert_family_parity_and_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    cls, cfg_cls = {
        "bert": (transformers.BertModel, transformers.BertConfig),
        "roberta": (transformers.RobertaModel, transformers.RobertaConfig),
    }[arch]
    ref = _save(cls(cfg_cls(**TEXT)), tmp_path / "ref")
    module, variables = load_hf(tmp_path / "ref")
    ids, mask = _text_inputs(module.pad_token_id)
    # A left-padded row: RoBERTa's positions then start after the padding, as HF computes them.
    ids = np.concatenate([ids, np.roll(ids[:1], 3, axis=1)])
    mask = np.concatenate([mask, np.roll(mask[:1], 3, axis=1)])
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    ours = jax.jit(module.apply)(variables, jnp.asarray(ids), jnp.asarray(mask))
    _check(out, ours, {"tokens": "last_hidden_state", "pooler_output": "pooler_output"})

    back = cls.from_pretrained(export_hf(module, variables, tmp_path / "exported")).eval()
    with torch.no_grad():
        out2 = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    _check(out2, ours, {"tokens": "last_hidden_state", "pooler_output": "pooler_output"})


def test_vit_parity_and_round_trip(tmp_path):
    torch.manual_seed(0)
    ref = _save(transformers.ViTModel(transformers.ViTConfig(**VISION)), tmp_path / "ref")
    module, variables = load_hf(tmp_path / "ref")
    assert module.layout == "hf" and module.pooler
    x = _images()
    with torch.no_grad():
        out = ref(pixel_values=_torch_images(x))
    ours = jax.jit(module.apply)(variables, jnp.asarray(x))
    _check(out, ours, {"tokens": "last_hidden_state", "pooler_output": "pooler_output"})

    back = transformers.ViTModel.from_pretrained(export_hf(module, variables, tmp_path / "e"))
    with torch.no_grad():
        out2 = back.eval()(pixel_values=_torch_images(x))
    _check(out2, ours, {"tokens": "last_hidden_state", "pooler_output": "pooler_output"})


@pytest.mark.parametrize("eos_token_id", [2, 97])
def test_clip_parity_and_round_trip(tmp_path, eos_token_id):
    """Both towers of a CLIPModel; eos 2 = legacy argmax pooling, else first eos position."""
    torch.manual_seed(0)
    text = dict(TEXT, eos_token_id=eos_token_id, bos_token_id=96, pad_token_id=1)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24)
    ref = _save(transformers.CLIPModel(cfg), tmp_path / "ref")
    module, variables = load_hf(tmp_path / "ref")
    ids, mask = _text_inputs(1)
    ids[:, 0] = 96
    ids[0, 5], ids[1, 8] = 97, 97  # end-of-text; the argmax rule also finds it (largest id)
    x = _images()
    with torch.no_grad():
        t = ref.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        v = ref.vision_model(pixel_values=_torch_images(x))
        t_emb = ref.get_text_features(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        )
        v_emb = ref.get_image_features(pixel_values=_torch_images(x))
    ours = jax.jit(module.apply)(variables, jnp.asarray(x), jnp.asarray(ids), jnp.asarray(mask))
    _check(t, ours["text"], {"tokens": "last_hidden_state", "pooler_output": "pooler_output"})
    _check(v, ours["image"], {"tokens": "last_hidden_state", "pooler_output": "pooler_output"})
    for ref_emb, ours_emb in ((t_emb, ours["text"]["pooled"]), (v_emb, ours["image"]["pooled"])):
        ref_emb = getattr(ref_emb, "pooler_output", ref_emb)
        assert _max_diff(ref_emb, ours_emb) < TOL
    assert abs(float(ours["logit_scale"]) - float(ref.logit_scale.exp())) < 1e-4

    back = transformers.CLIPModel.from_pretrained(export_hf(module, variables, tmp_path / "e"))
    with torch.no_grad():
        v2 = back.eval().vision_model(pixel_values=_torch_images(x))
    _check(v2, ours["image"], {"tokens": "last_hidden_state"})


@pytest.mark.parametrize(
    "cls_name", ["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection"]
)
def test_clip_single_tower_folders(tmp_path, cls_name):
    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    text_cfg = transformers.CLIPTextConfig(**TEXT, eos_token_id=2, projection_dim=24)
    vision_cfg = transformers.CLIPVisionConfig(**VISION, projection_dim=24)
    ref = _save(cls(vision_cfg if "Vision" in cls_name else text_cfg), tmp_path / "ref")
    module, variables = load_hf(tmp_path / "ref")
    if "Vision" in cls_name:
        x = _images()
        args, kwargs = (jnp.asarray(x),), dict(pixel_values=_torch_images(x))
    else:
        ids, mask = _text_inputs(1)
        args = (jnp.asarray(ids), jnp.asarray(mask))
        kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    with torch.no_grad():
        out = ref(**kwargs)
    ours = jax.jit(module.apply)(variables, *args)
    pairs = {"tokens": "last_hidden_state"}
    pairs["pooled"] = "text_embeds" if "Text" in cls_name else "image_embeds"
    if cls_name == "CLIPTextModel":
        pairs["pooled"] = "pooler_output"
    _check(out, ours, pairs)

    back = cls.from_pretrained(export_hf(module, variables, tmp_path / "e")).eval()
    with torch.no_grad():
        _check(back(**kwargs), ours, pairs)


def test_clip_tower_from_dual_checkpoint_and_scan_layout(tmp_path):
    """A method-built text tower (scanned layers) loads from a CLIPModel folder."""
    cfg = transformers.CLIPConfig(
        text_config=dict(TEXT, eos_token_id=2), vision_config=VISION, projection_dim=24
    )
    _save(transformers.CLIPModel(cfg), tmp_path / "ref")
    dual, dual_vars = load_hf(tmp_path / "ref")
    text = dual.text.clone(
        transformer=dual.text.transformer.__class__(
            **{**dual.text.transformer.__dict__, "scan": True}
        )
    )
    params = load_hf_params(tmp_path / "ref", text)
    assert params["params"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 37)
    ids, mask = _text_inputs(1)
    ours = jax.jit(text.apply)(params, jnp.asarray(ids), jnp.asarray(mask))
    ref = dual.apply(dual_vars, jnp.asarray(ids), jnp.asarray(mask), method="encode_text")
    assert _max_diff(ours["pooled"], ref["pooled"]) < 1e-5


def test_resnet50_parity_train_and_eval_stem_and_export(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    ref = torchvision.models.resnet50()
    # Non-trivial running statistics so eval-mode batch norm is tested.
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet50.safetensors"
    save_file(ref.state_dict(), str(path))
    module, variables = load_torchvision_resnet50(path)
    x = _images(size=64)
    trunk = torch.nn.Sequential(*list(ref.children())[:-2])
    with torch.no_grad():
        eval_map = trunk.eval()(_torch_images(x)).permute(0, 2, 3, 1)
        train_map = trunk.train()(_torch_images(x)).permute(0, 2, 3, 1)

    @jax.jit
    def run(v, x):
        return module.apply(v, x), module.apply(v, x, train=True, mutable=["batch_stats"])

    ours, (ours_train, state) = run(variables, jnp.asarray(x))
    diffs = {
        "eval_feature_map": _max_diff(eval_map, ours["feature_map"]) / float(eval_map.abs().max()),
        "eval_pooled": _max_diff(eval_map.mean((1, 2)), ours["pooled"])
        / float(eval_map.abs().max()),
        "running_mean": _max_diff(ref.bn1.running_mean, state["batch_stats"]["bn1"]["mean"]),
    }
    assert max(diffs.values()) < TOL, diffs
    # Batch statistics over 8 positions in layer4 are ill-conditioned: PyTorch's own fp32
    # output differs from its float64 output by 2.8e-4 (relative) here.
    train_diff = _max_diff(train_map, ours_train["feature_map"]) / float(train_map.abs().max())
    assert train_diff < 1e-3

    # One-channel stem: the RGB stem summed over its input channels.
    _, grey = load_torchvision_resnet50(path, channels=1)
    stem = ref.conv1.weight.detach().sum(1, keepdim=True).permute(2, 3, 1, 0)
    assert grey["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)
    assert _max_diff(stem, grey["params"]["conv1"]["kernel"]) < 1e-6

    out = export_torchvision_resnet50(state | {"params": variables["params"]}, tmp_path / "b.st")
    missing, unexpected = ref.load_state_dict(load_file(str(out)), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    np.testing.assert_allclose(
        ref.bn1.running_mean.numpy(), state["batch_stats"]["bn1"]["mean"], atol=1e-6
    )
