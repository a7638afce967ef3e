"""Mesh resolution and the clear errors for meshes that do not fit."""

import jax
import pytest

from medvlp_jax import config as config_lib
from medvlp_jax.parallel import mesh as mesh_lib
from medvlp_jax.parallel.sharding import _param_spec


def _mesh_cfg(**kw):
    cfg = config_lib.base_config().mesh
    cfg.update(kw)
    return cfg


def test_minus_one_takes_the_rest():
    assert mesh_lib.mesh_shape(_mesh_cfg(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_lib.mesh_shape(_mesh_cfg(strategy="fsdp"), 8) == (1, 8, 1)


def test_mesh_that_does_not_fit_devices_names_numbers():
    with pytest.raises(mesh_lib.MeshError, match="multiple of 3 devices, but there are 8"):
        mesh_lib.mesh_shape(_mesh_cfg(data=-1, fsdp=3), 8)


def test_batch_not_divisible_names_both_numbers():
    mesh = mesh_lib.make_mesh(_mesh_cfg(data=2, fsdp=4))
    with pytest.raises(mesh_lib.MeshError, match=r"data.batch_size=12 .* 8 batch shards"):
        mesh_lib.check_batch_divides(mesh, 12, "data.batch_size")


def test_param_specs_fsdp_largest_divisible_and_tensor_by_name():
    mesh = mesh_lib.make_mesh(_mesh_cfg(data=2, fsdp=2, tensor=2))
    spec = _param_spec((64, 256), jax.sharding.PartitionSpec("embed", "mlp"), mesh)
    assert tuple(spec) == ("fsdp", "tensor")
    small = _param_spec((3,), jax.sharding.PartitionSpec("embed"), mesh)
    assert tuple(small) == (None,)
    odd = _param_spec((3, 3, 3, 64), None, mesh)
    assert tuple(odd) == (None, None, None, "fsdp")
