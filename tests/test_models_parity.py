"""Numerical parity of imported checkpoints with the PyTorch reference models (fp32, eval).

The cases of `medvlp_jax.bench.parity` (whose figures the README's table shows): tiny random
transformers / torchvision models are saved to tmp_path, loaded with our importers, and
compared on the same inputs; then exported back and reloaded by transformers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medvlp_jax.bench import parity  # noqa: E402
from medvlp_jax.bench.parity import TOL  # noqa: E402
from medvlp_jax.models import (  # noqa: E402
    export_torchvision_resnet50,
    load_hf,
    load_hf_params,
    load_torchvision_resnet50,
)
from medvlp_jax.models.testing import fast_compile  # noqa: E402


@pytest.fixture(autouse=True)
def _fast_compile():
    with fast_compile():
        yield


def _assert_within(p: parity.Parity, tol: float = TOL) -> None:
    for figures in (p.diffs, p.round_trip):
        assert figures and max(figures.values()) < tol, figures


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bert_family_parity_and_round_trip(tmp_path, arch):
    p = parity.bert_family(tmp_path, arch)
    assert set(p.diffs) == set(p.round_trip) == {"tokens", "pooler_output"}
    _assert_within(p)


def test_vit_parity_and_round_trip(tmp_path):
    p = parity.vit(tmp_path)
    module = p.objects["module"]
    assert module.layout == "hf" and module.pooler
    assert set(p.diffs) == set(p.round_trip) == {"tokens", "pooler_output"}
    _assert_within(p)


@pytest.mark.parametrize("eos_token_id", [2, 97])
def test_clip_parity_and_round_trip(tmp_path, eos_token_id):
    """Both towers of a CLIPModel; eos 2 = legacy argmax pooling, else first eos position."""
    p = parity.clip(tmp_path, eos_token_id)
    towers = {f"{t}/{k}" for t in ("text", "image") for k in ("tokens", "pooler_output", "embeds")}
    assert set(p.diffs) == towers | {"logit_scale"} and set(p.round_trip) == towers
    _assert_within(p)


@pytest.mark.parametrize("cls_name", parity.CLIP_TOWERS)
def test_clip_single_tower_folders(tmp_path, cls_name):
    p = parity.clip_tower(tmp_path, cls_name)
    assert set(p.diffs) == set(p.round_trip) == {"tokens", "pooled"}
    _assert_within(p)


def test_clip_tower_from_dual_checkpoint_and_scan_layout(tmp_path):
    """A method-built text tower (scanned layers) loads from a CLIPModel folder."""
    cfg = transformers.CLIPConfig(
        text_config=dict(parity.TEXT, eos_token_id=2),
        vision_config=parity.VISION,
        projection_dim=24,
    )
    parity.save_reference(transformers.CLIPModel(cfg), tmp_path / "ref")
    dual, dual_vars = load_hf(tmp_path / "ref")
    text = dual.text.clone(
        transformer=dual.text.transformer.__class__(
            **{**dual.text.transformer.__dict__, "scan": True}
        )
    )
    params = load_hf_params(tmp_path / "ref", text)
    assert params["params"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 37)
    ids, mask = parity.text_inputs(1)
    ours = jax.jit(text.apply)(params, jnp.asarray(ids), jnp.asarray(mask))
    ref = dual.apply(dual_vars, jnp.asarray(ids), jnp.asarray(mask), method="encode_text")
    assert parity.max_diff(ours["pooled"], ref["pooled"]) < 1e-5


def test_resnet50_parity_train_and_eval_stem_and_export(tmp_path):
    pytest.importorskip("torchvision")
    from safetensors.torch import load_file

    p = parity.resnet50(tmp_path)
    diffs = dict(p.diffs)
    # Train mode: PyTorch's own fp32 output differs from its float64 one by 2.8e-4 (relative).
    assert diffs.pop("train/feature_map") < parity.RESNET_TRAIN_TOL
    assert set(diffs) == {"eval/feature_map", "eval/pooled", "train/running_mean"}
    assert max(diffs.values()) < TOL, diffs
    ref, path, variables, state = (p.objects[k] for k in ("ref", "path", "variables", "state"))

    # One-channel stem: the RGB stem summed over its input channels.
    _, grey = load_torchvision_resnet50(path, channels=1)
    stem = ref.conv1.weight.detach().sum(1, keepdim=True).permute(2, 3, 1, 0)
    assert grey["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)
    assert parity.max_diff(stem, grey["params"]["conv1"]["kernel"]) < 1e-6

    out = export_torchvision_resnet50(state | {"params": variables["params"]}, tmp_path / "b.st")
    missing, unexpected = ref.load_state_dict(load_file(str(out)), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    np.testing.assert_allclose(
        ref.bn1.running_mean.numpy(), state["batch_stats"]["bn1"]["mean"], atol=1e-6
    )


def test_minilm_real_weights_parity():
    """The packaged all-MiniLM-L6-v2 (BERT, 6 x 384, uncased WordPiece): hidden states and
    sentence embeddings of a padded batch (the README's last row)."""
    p = parity.minilm()
    assert p.diffs["tokens"] < TOL and p.diffs["sentence_embedding"] < 1e-5, p.diffs
    module, tok, ids, mask = (p.objects[k] for k in ("module", "tokenizer", "ids", "mask"))
    t = module.transformer
    assert (t.width, t.num_layers, module.vocab_size) == (384, 6, 30522)
    assert ids[0, 0] == tok.cls_token_id and mask[0].sum() < mask.shape[1]  # a padded row
    emb = np.asarray(p.objects["embedding"])
    assert float(np.abs(emb[0] @ emb[1])) < 0.99  # distinct sentences stay apart
