"""Random variables for a module without compiling its initializers (tests, benchmarks).

`module.init` compiles one random-number program per parameter shape, which takes seconds on
a loaded CPU; `random_variables` builds the variable tree from `jax.eval_shape` and fills it
with numpy draws instead.
"""

from __future__ import annotations

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
