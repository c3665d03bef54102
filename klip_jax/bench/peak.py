"""Peak FLOP/s of accelerators, for model FLOPs utilisation (MFU).

Dense bf16 peaks per chip from the vendors' datasheets (NVIDIA's are the SXM parts, without
the 2x sparsity factor); `device_kind` strings are what jax reports. A CPU or an unlisted
device has no known peak: pass it in (`klip bench train --peak-tflops`).
"""

from __future__ import annotations

import jax

# (substring of the lower-cased device_kind, TFLOP/s). Order matters: "v5 lite" before "v5", and
# the PCIe and NVL cards (lower clocks and power: H100 PCIe 756, H100 NVL and H200 NVL 835)
# before the SXM parts of the same name.
PEAK_TFLOPS = (("tpu v4", 275.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v5p", 459.0),
               ("tpu v5", 459.0), ("tpu v6 lite", 918.0), ("tpu v6e", 918.0), ("a100", 312.0),
               ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h200 nvl", 835.0), ("h100", 989.0), ("h200", 989.0))


def device_peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of one chip of this kind, None when unknown."""
  kind = device_kind.lower()
  return next((tflops for name, tflops in PEAK_TFLOPS if name in kind), None)


def peak_tflops(override: float | None = None) -> tuple[float | None, str]:
  """(peak TFLOP/s per device, where the number came from) for this process's devices."""
  kind = jax.devices()[0].device_kind
  if override:
    return float(override), f"given (--peak-tflops) for {kind}"
  known = device_peak_tflops(kind)
  return known, (f"datasheet bf16 peak of {kind}" if known else f"unknown for {kind}; pass --peak-tflops")


def mfu(flops_per_step: float, step_seconds: float, devices: int, peak: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s per device over the device's peak."""
  if not peak or not step_seconds:
    return None
  return flops_per_step / step_seconds / devices / (peak * 1e12)
