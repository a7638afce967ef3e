"""Helpers for fast tests and benchmarks on the CPU.

`module.init` compiles one random-number program per parameter shape, which takes seconds on
a loaded CPU; `random_variables` builds the variable tree from `jax.eval_shape` and fills it
with numpy draws instead. `fast_compile` turns off most XLA optimisations, which halves the
compile time that dominates tests of tiny models.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util


def random_variables(module: nn.Module, *args, seed: int = 0, std: float = 0.02, **kwargs) -> dict:
    """Variables with the structure `module.init(key, *args, **kwargs)` returns, unboxed.

    Norm scales ~ 1 + N(0, 0.1), running variances ~ U(0.5, 1.5), everything else
    ~ N(0, std) (biases, running means, positional tables included). Numpy arrays of the
    declared dtypes.
    """
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    rng = np.random.RandomState(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(nn.meta.unbox(abstract)).items():
        shape, name = leaf.shape, path[-1]
        if name == "var":
            x = rng.uniform(0.5, 1.5, shape)
        elif name == "scale":
            x = 1.0 + 0.1 * rng.randn(*shape)
        else:
            x = std * rng.randn(*shape)
        out[path] = np.asarray(x, dtype=leaf.dtype)
    return traverse_util.unflatten_dict(out)


@contextlib.contextmanager
def fast_compile() -> Iterator[None]:
    """While active, jit compiles with most XLA optimisations off (tiny-model tests); a no-op
    under `MEDVLP_TEST_XLA_DEFAULT=1` (tests/test_optimised_path.py: XLA's defaults)."""
    if os.environ.get("MEDVLP_TEST_XLA_DEFAULT", "") == "1":
        yield
        return
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
