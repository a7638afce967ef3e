"""Throughput figures of a compiled train step: examples/s, TFLOP/s and MFU per device.

The step's FLOPs come from XLA's cost analysis of the compiled (partitioned) executable, so
they count what one device runs per step; MFU divides the achieved rate by the device's
dense bf16 peak where the device kind is in `PEAK_BF16_TFLOPS` (no MFU elsewhere, e.g. on CPUs).
"""

from __future__ import annotations

import jax

# Dense bf16 peak per chip (TFLOP/s), by a substring of `jax.Device.device_kind`; first match
# wins, so more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0),  # Trillium, v6e
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
    ("TPU v2", 45.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("A10G", 125.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of one `device_kind` chip in TFLOP/s, or None when unknown."""
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_kind), None)


def step_flops(compiled) -> float | None:
    """FLOPs one device runs per call of `compiled` (a `jax.stages.Compiled`), or None when
    XLA gives no estimate."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX: one dict per executable
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


class Throughput:
    """Turns (examples, seconds) into the `train/` throughput metrics of one step."""

    def __init__(self, flops_per_step: float | None, devices=None):
        devices = jax.devices() if devices is None else devices
        self.num_devices = len(devices)
        self.flops = flops_per_step
        self.peak = peak_tflops(devices[0].device_kind)

    def metrics(self, global_batch: int, seconds_per_step: float) -> dict[str, float]:
        """`train/examples_per_s`, `train/examples_per_s_per_device`, and where known
        `train/tflops_per_device` and `train/mfu` (0..1)."""
        per_s = global_batch / max(seconds_per_step, 1e-9)
        out = {
            "train/examples_per_s": per_s,
            "train/examples_per_s_per_device": per_s / self.num_devices,
        }
        if self.flops is not None:
            tflops = self.flops / max(seconds_per_step, 1e-9) / 1e12
            out["train/tflops_per_device"] = tflops
            if self.peak is not None:
                out["train/mfu"] = tflops / self.peak
        return out
