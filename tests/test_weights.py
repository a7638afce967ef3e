"""The weight-loading plan of `config.init` loads on hand-made trees: renaming with `map`,
`dont_load`, strict missing / unexpected keys, shape checks, load order, and which loads a
subtree or a later stage needs."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from medvlp_jax import checkpointing, weights


def _target() -> weights.Flat:
    return {
        "params": {
            "image/conv/kernel": np.zeros((3, 3)),
            "image/head/kernel": np.zeros((3, 2)),
            "text/emb": np.zeros((5, 4)),
        },
        "batch_stats": {"image/bn/mean": np.zeros(3)},
    }


def _source() -> weights.Flat:
    return {
        "params": {
            "conv/kernel": np.ones((3, 3)),
            "head/kernel": np.ones((3, 2)),
            "extra/bias": np.ones(2),
        },
        "batch_stats": {"bn/mean": np.full(3, 2.0)},
    }


def test_into_map_and_dont_load():
    spec = weights.load_spec(
        "src",
        into="image",
        map=(r"(conv|bn)/(.*) -> \1/\2", r"head/kernel -> head/kernel"),
        dont_load=(r"image/head/.*",),
    )
    loaded, missing, unexpected = weights.plan("x", spec, _source(), _target())
    assert set(loaded["params"]) == {"image/conv/kernel"}
    np.testing.assert_array_equal(loaded["params"]["image/conv/kernel"], np.ones((3, 3)))
    np.testing.assert_array_equal(loaded["batch_stats"]["image/bn/mean"], np.full(3, 2.0))
    assert missing == []  # image/head is dont_load; text/ is outside `into`
    assert unexpected == ["params/extra/bias"]  # no map row takes it


def test_a_map_row_without_destination_skips_on_purpose():
    spec = weights.load_spec("src", into="image", map=(r"extra/.* ->", r"(.*) -> \1"))
    loaded, missing, unexpected = weights.plan("x", spec, _source(), _target())
    assert set(loaded["params"]) == {"image/conv/kernel", "image/head/kernel"}
    assert missing == [] and unexpected == []  # extra/bias skipped, not unexpected
    weights._check("x", spec, missing, unexpected)  # strict, and nothing to complain about


def test_strict_lists_missing_and_unexpected_keys():
    spec = weights.load_spec("src", into="image", dont_load=(r"image/head/.*",))
    source = _source()
    del source["params"]["conv/kernel"]
    _, missing, unexpected = weights.plan("x", spec, source, _target())
    assert missing == ["params/image/conv/kernel"] and unexpected == ["params/extra/bias"]
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"image/conv/kernel.*extra"):
        weights._check("x", spec, missing, unexpected)
    weights._check("x", weights.load_spec("src", strict=False), missing, unexpected)  # logged


def test_a_shape_mismatch_is_always_an_error():
    source = {"params": {"emb": np.ones((5, 3))}}
    spec = weights.load_spec("src", into="text", strict=False)
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"\(5, 3\).*\(5, 4\)"):
        weights.plan("x", spec, source, _target())


def test_a_bad_map_row_names_the_field():
    spec = weights.load_spec("src", map=("conv/kernel",))
    with pytest.raises(ValueError, match=r"config.init.x.map\[0\]"):
        weights.plan("x", spec, _source(), _target())


def test_overwrite_replaces_only_the_loaded_leaves():
    variables = {"params": {"a": {"k": np.zeros(2)}, "b": np.zeros(1)}}
    out = weights.overwrite(variables, {"params": {"a/k": np.ones(2)}})
    np.testing.assert_array_equal(out["params"]["a"]["k"], np.ones(2))
    assert out["params"]["b"] is variables["params"]["b"]


def test_load_order_loads_writing_and_changed_loads():
    init = ml_collections.ConfigDict(
        {
            "warm": weights.load_spec("run", order=1),
            "text": weights.load_spec("minilm", into="text"),
            "image": weights.load_spec("r.safetensors", into="image"),
            "deep": weights.load_spec("hf", into="text/encoder"),
        }
    )
    assert weights.load_order(init) == ["deep", "image", "text", "warm"]
    assert weights.loads_writing(init, "text") == ["deep", "text", "warm"]
    assert weights.loads_writing(init, "image") == ["image", "warm"]
    later = ml_collections.ConfigDict(init.to_dict())
    later.image.source = "other.safetensors"
    later.extra = weights.load_spec("x", into="heads")
    assert weights.changed_loads(None, init) == weights.load_order(init)
    assert weights.changed_loads(init, later) == ["extra", "image"]
