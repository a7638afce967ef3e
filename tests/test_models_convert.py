"""Checkpoint errors name what is wrong; the packaged MiniLM matches PyTorch."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from medvlp_jax.models import (
    BertEncoder,
    CheckpointError,
    build_image_tower,
    build_text_tower,
    export_hf,
    load_hf,
    load_hf_params,
    tower_config,
)
from medvlp_jax.models.testing import fast_compile, random_variables

QUERY = "encoder.layer.0.attention.self.query.weight"


@pytest.fixture(autouse=True)
def _fast_compile():
    with fast_compile():
        yield


@pytest.fixture
def bert_folder(tmp_path):
    tower = build_text_tower(tower_config("bert", "tiny"))
    export_hf(tower, random_variables(tower, *tower.example_inputs(1)), tmp_path / "bert")
    return tmp_path / "bert"


def _edit(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def test_wrong_architecture_names_model_type_and_supported(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(CheckpointError, match=r"'gpt2'.*GPT2LMHeadModel.*Supported: bert"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_hf(tmp_path / "missing")


def test_module_and_folder_of_different_architectures(bert_folder):
    vit = build_image_tower(tower_config("vit", "tiny"))
    with pytest.raises(CheckpointError, match=r"'bert' checkpoint.*loads from: clip_vision_model"):
        load_hf_params(bert_folder, vit)


def test_missing_and_extra_tensors_are_listed(bert_folder):
    def edit(t):
        del t[QUERY]
        t["encoder.layer.0.attention.self.extra.weight"] = np.zeros((2, 2), np.float32)

    _edit(bert_folder, edit)
    with pytest.raises(CheckpointError) as e:
        load_hf(bert_folder)
    msg = str(e.value)
    assert "1 tensor(s) the module needs are missing: " + QUERY in msg
    assert "1 tensor(s) the module does not use: encoder.layer.0.attention.self.extra.weight" in msg
    assert "model.safetensors" in msg


def test_shape_mismatch_names_tensor_and_both_shapes(bert_folder):
    _edit(bert_folder, lambda t: t.update({QUERY: np.zeros((32, 16), np.float32)}))
    with pytest.raises(
        CheckpointError, match=rf"'{QUERY}' has shape \(32, 16\) but the module expects \(32, 32\)"
    ):
        load_hf(bert_folder)


def test_task_model_prefix_and_head_tensors(bert_folder):
    """A BertForMaskedLM-style file ('bert.' prefix + 'cls.' head) loads its base model."""
    _edit(
        bert_folder,
        lambda t: t.update(
            {
                **{f"bert.{k}": t.pop(k) for k in list(t)},
                "cls.predictions.bias": np.zeros(100, np.float32),
            }
        ),
    )
    module, _variables = load_hf(bert_folder)
    assert isinstance(module, BertEncoder) and module.pooler
