"""The train state: everything a step changes, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """All that a train step reads and writes.

    Attributes:
      step: int32 scalar, steps taken.
      params: the parameters (frozen ones included; the optimizer masks them).
      opt_state: optax state; frozen parameters hold none.
      model_state: mutable model collections other than params, e.g. {'batch_stats': ...}.
      rng: uint32 [2] raw PRNG key; step keys are `fold_in(rng, step)`, so resuming is exact.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any
    rng: jax.Array

    def variables(self) -> dict:
        """The Flax variables dict for `module.apply`."""
        return {"params": self.params, **self.model_state}
