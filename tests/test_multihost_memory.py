"""Per-device train-state memory of the sharding strategies (`bench/memory.py`), from shapes and
shardings only: the ViT-B/16 + BERT-base CLIP step is traced, never compiled or allocated."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medvlp_jax import config as config_lib
from medvlp_jax.bench import memory


def test_sharded_bytes_counts_one_devices_shard():
    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
    split, whole = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    tree = {
        "split": jax.ShapeDtypeStruct((64, 30), np.float32, sharding=split),
        "whole": jax.ShapeDtypeStruct((16,), np.int32, sharding=whole),
    }
    assert memory.sharded_bytes(tree) == 8 * 30 * 4 + 16 * 4
    assert memory.replicated_fraction(tree) == pytest.approx(16 / (64 * 30 + 16))


@pytest.fixture(scope="module")
def base_steps() -> dict:
    config = config_lib.load_config_file("configs/clip.py:base")
    return {s: memory.abstract_step(config, s, batch_size=64) for s in ("dp", "fsdp", "fsdp_tp")}


def test_replicated_state_is_params_plus_two_adam_moments(base_steps):
    params = base_steps["dp"].state.params
    n = sum(x.size for x in jax.tree.leaves(params))
    assert 190e6 < n < 200e6  # ViT-B/16 (86M) + BERT-base (110M) + projections
    # fp32 params + Adam mu and nu; the rest is the step, the RNG key and Adam's counters.
    assert 0 <= memory.sharded_bytes(base_steps["dp"].state) - 12 * n < 64


def test_fsdp_and_tensor_parallel_hold_an_eighth_of_the_state(base_steps):
    full = memory.sharded_bytes(base_steps["dp"].state)
    for strategy in ("fsdp", "fsdp_tp"):
        step = base_steps[strategy]
        assert dict(step.mesh.shape) == (
            {"data": 1, "fsdp": 8, "tensor": 1}
            if strategy == "fsdp"
            else {"data": 1, "fsdp": 4, "tensor": 2}
        )
        ratio = memory.sharded_bytes(step.state) / full
        assert 1 / 8 <= ratio < 1.02 / 8, (strategy, ratio)
        assert memory.replicated_fraction(step.state.params) < 0.002
    mlp = base_steps["fsdp_tp"].state.params["image"]["encoder"]["layer_0"]["mlp"]["fc1"]
    assert mlp["kernel"].sharding.spec == P("fsdp", "tensor")  # [embed, mlp]: mlp over tensor
