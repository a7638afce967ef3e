"""Random draws inside a jitted step that compile fast on XLA:CPU.

JAX's default threefry is the *partitionable* variant: each device generates only its shard
of a sharded random array. On XLA:CPU it compiles slower (measured, PTUnifier's tiny loss
gradient, 2 quiet cores, default XLA flags: 27.6 s with it, 20.3 s without; 106 s vs 60 s
before its passes were stacked; M-FLAG's init saw 5x), and a CPU run has at most one host's
devices, where generating the whole array is cheap. Both
variants are deterministic functions of the key that do not depend on the mesh; they give
different bits from each other, so a CPU run's dropout masks differ from an accelerator's.
"""

from __future__ import annotations

import contextlib

import jax


def step_rng_context():
    """Wrap the tracing of a step's random draws (dropout, masking) in this: the
    non-partitionable threefry on the CPU backend, the default elsewhere."""
    if jax.default_backend() == "cpu":
        return jax.threefry_partitionable(False)
    return contextlib.nullcontext()
