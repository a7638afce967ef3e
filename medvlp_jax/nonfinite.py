"""The non-finite guard: a step whose loss or gradient norm is not finite changes nothing.

In the compiled step, `keep_if_finite` selects the state before the step (elementwise, fused
into the update) when the step's loss or global gradient norm is NaN or infinite, so a
non-finite value never reaches the parameters, the optimizer state, the batch statistics, or
any checkpoint. Only the step counter moves on. The step reports `nonfinite` (0 or 1) and
`grad_norm` in its metrics.

On the host, `NonfiniteGuard` reads each step's flag one step late (the next step is already
dispatched, so the device never idles), and at once before an evaluation or a save. Policy
`train.on_nonfinite`:
  - "stop": the run ends with `NonFiniteError` naming the step, the metric and its value,
    and the last good checkpoint;
  - "skip": the step is dropped and counted (`train/nonfinite_skipped`); more than
    `train.max_nonfinite_in_row` dropped steps in a row end the run the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; nothing of that step was kept."""


def keep_if_finite(finite: jax.Array, new, old):
    """`new` where the scalar bool `finite` holds, else `old` (two trees of one structure)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def step_is_finite(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """Scalar bool: both the loss and the global gradient norm are finite."""
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


class NonfiniteGuard:
    """Host side of the guard for one stage's loop.

    Args:
      policy: "stop" or "skip".
      max_in_row: under "skip", the most dropped steps in a row before the run stops.
      last_good: `() -> str` describing the last complete checkpoint (read only on failure).
    """

    def __init__(self, policy: str, max_in_row: int, last_good):
        if policy not in POLICIES:
            raise ValueError(f"config.train.on_nonfinite={policy!r}; expected one of {POLICIES}")
        self.policy = policy
        self.max_in_row = max_in_row
        self._last_good = last_good
        self._pending: tuple[int, dict] | None = None
        self.skipped = 0
        self.in_row = 0

    def dispatched(self, step: int, metrics: dict) -> None:
        """Call right after dispatching `step`: checks the step before it, keeps this one."""
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        """Checks the step still unread (blocks until it has run)."""
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        if not int(metrics["nonfinite"]):
            self.in_row = 0
            return
        self._on_nonfinite(step, metrics)

    def _on_nonfinite(self, step: int, metrics: dict) -> None:
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        what = f"the training loss is {loss}" if not np.isfinite(loss) else "the loss is finite"
        what += f" and the gradient norm is {grad_norm}"
        if self.policy == "skip":
            self.skipped += 1
            self.in_row += 1
            logging.warning("step %d skipped: %s (%d in a row)", step, what, self.in_row)
            if self.in_row <= self.max_in_row:
                return
            cause = (
                f"{self.in_row} steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_in_row={self.max_in_row}); the last at step {step}: {what}"
            )
        else:
            cause = f"at step {step} {what}"
        raise NonFiniteError(
            f"{cause}. That step was not applied and nothing non-finite was saved; "
            f"{self._last_good()}. Lower optim.lr, check the data and the tokenizer's vocabulary "
            "against the text tower, or set train.on_nonfinite=skip to drop such steps."
        )

    def metrics(self) -> dict:
        """`{'train/nonfinite_skipped': steps dropped so far in this process}`."""
        return {"train/nonfinite_skipped": self.skipped}
