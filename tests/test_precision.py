"""Mixed precision from `train.compute_dtype` (medvlp_jax/precision.py): with 'bfloat16' every
matrix product of every model runs in bf16 while params, gradients and losses stay float32;
a tower dtype set explicitly in the config overrides the switch.

The dtypes are read from the lowered HLO of the jitted gradient (what the program asks of any
backend; op names there carry the Flax module path). The compiled program is checked to keep
bf16 dots too: XLA:CPU upcasts the convolutions it cannot run in bf16, a backend choice.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medvlp_jax import config as config_lib
from medvlp_jax import embedding_cache, precision
from medvlp_jax.data import pipeline, sources, tokenize
from medvlp_jax.methods.base import get_method
from medvlp_jax.parallel.sharding import strip_boxes

ROOT = Path(__file__).resolve().parents[1]
# Top-level Flax modules whose ops are "the model" (everything else is a loss or glue).
MODEL_MODULES = ("TwoTower", "MFlagModel", "BertEncoder", "McplModel")
LOSS_RTOL = 2e-2  # |loss_bf16 - loss_fp32| / |loss_fp32| on the tiny configs (measured < 1e-2)

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[")
_MATMUL = re.compile(r"=\s*(\w+)\[[^\]]*\](?:\{[^}]*\})?\s+(dot|convolution)\(([^)]*)\)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# An op_name under a model module: ".../jvp(TwoTower)/..." or ".../jvp(MFlagModel.project)/...".
_INSIDE = re.compile(r"\((" + "|".join(MODEL_MODULES) + r")[.)]")


def matmuls(hlo: str) -> list[dict]:
    """Every dot / convolution of HLO text: {'kind', 'compute', 'name'}. `compute` is the
    operands' dtype ('bf16', 'f32'; a mixed pair reads 'f32+bf16'), or 'bf16' for a dot whose
    algorithm is bf16 x bf16 with f32 accumulation (jax's attention backward multiplies its
    f32 logit gradients that way); `name` is the op_name metadata ('' if absent)."""
    types = {}
    for line in hlo.splitlines():
        if m := _DEF.match(line):
            types[m[1]] = m[2]
    ops = []
    for line in hlo.splitlines():
        if not (m := _MATMUL.search(line)):
            continue
        operands = []
        for arg in m[3].split(","):
            words = arg.split()
            typed = re.match(r"(\w+)\[", words[0]) if len(words) > 1 else None
            operands.append(typed[1] if typed else types[words[-1].lstrip("%")])
        compute = "+".join(sorted(set(operands), reverse=True))
        if "algorithm=dot_bf16_bf16_f32" in line:
            compute = "bf16"
        name = _OP_NAME.search(line)
        ops.append({"kind": m[2], "compute": compute, "name": name[1] if name else ""})
    return ops


def model_ops(ops: list[dict], scope: str = "") -> list[dict]:
    """The ops inside one of MODEL_MODULES (and under the module path `scope`, if given)."""
    return [op for op in ops if _INSIDE.search(op["name"]) and scope in op["name"]]


def tiny(name: str, *overrides: str):
    config = config_lib.load_config_file(str(ROOT / f"configs/{name}.py:tiny"))
    return config_lib.apply_overrides(config, list(overrides))


def batch_for(method) -> dict:
    """One training batch of the method's config from the data pipeline (with its hooks)."""
    data = method.config.data
    tokenizer = tokenize.load_tokenizer(data.tokenizer)
    records = sources.load_records(data, "train")
    hooks = method.data_hooks(tokenizer)
    it = pipeline.train_iterator(data, records, tokenizer, seed=0, hooks=hooks)
    return {k: jnp.asarray(v) for k, v in next(it).items()}


def grad_fn(method, batch: dict):
    """jit((params, other collections) -> (training loss, its gradient w.r.t. params))."""
    rng = jax.random.key(1)

    def loss(params, rest):
        return method.loss({"params": params, **rest}, batch, rng, train=True)[0]

    return jax.jit(jax.value_and_grad(loss))


def lowered_hlo(lowered) -> str:
    return lowered.as_text(dialect="hlo", debug_info=True)


@pytest.mark.parametrize("name", ["clip", "mflag", "mcpl"])
def test_bfloat16_switch_computes_in_bf16_with_float32_params_grads_and_loss(name):
    bf16 = get_method(tiny(name, "train.compute_dtype=bfloat16"))
    fp32 = get_method(tiny(name))
    batch = batch_for(bf16)
    variables = strip_boxes(bf16.init(jax.random.key(0), batch))
    params = variables.pop("params")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}

    lowered = grad_fn(bf16, batch).lower(params, variables)
    ops = matmuls(lowered_hlo(lowered))
    ours = model_ops(ops)
    assert len(ours) >= 40, len(ours)  # forward and backward of both towers and the heads
    not_bf16 = [op for op in ours if op["compute"] != "bf16"]
    assert not not_bf16, not_bf16[:5]
    # What is left in float32 is the loss (e.g. the [B, B] logits), outside the model.
    assert all(op["compute"] == "f32" for op in ops if op not in ours)

    compiled = lowered.compile()
    assert any(
        op["kind"] == "dot" and op["compute"] == "bf16" for op in matmuls(compiled.as_text())
    )
    loss, grads = compiled(params, variables)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))

    # The float32 run of the same config: float32 everywhere, and nearly the same loss.
    fp32_fn = grad_fn(fp32, batch)
    fp32_ops = model_ops(matmuls(lowered_hlo(fp32_fn.lower(params, variables))))
    assert len(fp32_ops) == len(ours)
    assert all(op["compute"] == "f32" for op in fp32_ops)
    ref, _ = fp32_fn(params, variables)
    np.testing.assert_allclose(float(loss), float(ref), rtol=LOSS_RTOL)


def test_explicit_tower_dtype_overrides_the_switch():
    """CLIP with bf16 compute but `model.text.dtype=float32`: the text tower's products run in
    float32, the image tower's and the projections' in bf16."""
    config = tiny("clip", "train.compute_dtype=bfloat16", "model.text.dtype=float32")
    method = get_method(config)
    assert (method.config.model.image.dtype, method.config.model.text.dtype) == (
        "bfloat16",
        "float32",
    )
    batch = batch_for(method)
    variables = strip_boxes(jax.eval_shape(method.init, jax.random.key(0), batch))
    params = variables.pop("params")
    ops = matmuls(lowered_hlo(grad_fn(method, batch).lower(params, variables)))
    text, image = model_ops(ops, "/text/"), model_ops(ops, "/image/")
    projections = model_ops(ops, "_proj/")
    assert text and image and projections
    assert all(op["compute"] == "f32" for op in text)
    assert all(op["compute"] == "bf16" for op in image + projections)


def test_resolve_rule():
    """'' follows train.compute_dtype, an explicit dtype stays; the argument is not modified;
    resolving twice changes nothing; float32 compute resolves '' to 'float32'."""
    config = tiny("clip", "train.compute_dtype=bfloat16", "model.image.dtype=float32")
    resolved = precision.resolve(config)
    assert (config.model.image.dtype, config.model.text.dtype) == ("float32", "")
    assert (resolved.model.image.dtype, resolved.model.text.dtype) == ("float32", "bfloat16")
    assert resolved.model.text.param_dtype == "float32"
    assert precision.resolve(resolved).to_dict() == resolved.to_dict()
    assert precision.resolve(tiny("clip")).model.text.dtype == "float32"
    assert precision.compute_dtype(config) == jnp.bfloat16
    frozen = precision.resolve_tower(ml_collections.FrozenConfigDict(config.model.text), config)
    assert isinstance(frozen, ml_collections.FrozenConfigDict) and frozen.dtype == "bfloat16"


def test_mcpl_backbone_towers_follow_the_switch():
    method = get_method(tiny("mcpl", "train.compute_dtype=bfloat16"))
    assert (method.spec.image.dtype, method.spec.text.dtype) == ("bfloat16", "bfloat16")
    assert method.model.dtype == jnp.bfloat16


def test_mflag_text_cache_key_changes_with_the_lm_dtype():
    """M-FLAG keys its frozen-LM cache on the (resolved) LM tower config: bf16 and float32
    [CLS] embeddings never share an entry."""
    tokenizer = tokenize.load_tokenizer("")
    params = {"a": np.zeros((2, 3), np.float32)}

    def key(*overrides):
        text = get_method(tiny("mflag", *overrides)).config.model.text.to_dict()
        return embedding_cache.cache_key(
            tower_config=text, params=params, tokenizer=tokenizer, max_len=8, texts=["x"]
        )[0]

    fp32, bf16 = key(), key("train.compute_dtype=bfloat16")
    assert fp32 != bf16
    assert key("train.compute_dtype=bfloat16", "model.text.dtype=float32") == fp32
