"""Peak FLOP/s of the devices at hand, for MFU = model FLOP/s achieved / peak FLOP/s.

Accelerator peaks are the vendors' dense (no sparsity) figures per chip. On TPUs a float32
matmul at JAX's default precision runs as bfloat16 passes on the MXU, and on Ampere and later
GPUs as TF32 on the tensor cores, so the float32 column holds those peaks. On a CPU there is no
table that fits the machine at hand: its peak is measured at start-up with a large matmul in
the model's dtype (or given as config.peak_flops).
"""

import time
from typing import Any

import jax
import jax.numpy as jnp

# (device_kind substring, lower-cased) -> {dtype: peak FLOP/s per chip}. First match wins,
# so more specific names come first.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("tpu v6 lite", {"bfloat16": 918e12, "float32": 918e12}),   # v6e (Trillium)
    ("tpu v6e", {"bfloat16": 918e12, "float32": 918e12}),
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": 197e12}),   # v5e
    ("tpu v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("tpu v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("tpu v5", {"bfloat16": 459e12, "float32": 459e12}),        # v5p reports "TPU v5"
    ("tpu v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("h200", {"bfloat16": 989e12, "float32": 495e12}),          # float32 = TF32
    ("h100 pcie", {"bfloat16": 756e12, "float32": 378e12}),
    ("h100", {"bfloat16": 989e12, "float32": 495e12}),          # SXM
    ("a100", {"bfloat16": 312e12, "float32": 156e12}),
)

_measured: dict[tuple[str, int], float] = {}
_MEASURED = "measured"  # How peak_flops() labels a measured peak.


def table_peak(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one chip from PEAK_FLOPS, or None for an unknown device."""
  kind = device_kind.lower()
  for name, peaks in PEAK_FLOPS:
    if name in kind:
      return peaks.get(dtype, peaks["bfloat16"])
  return None


def measure_matmul_peak(dtype: str = "float32", n: int = 2048, seconds: float = 1.0,
                        again: bool = False) -> float:
  """FLOP/s of this process's best n x n x n matmul in `dtype` (jitted, on device 0).

  The best of repeated timings, as a peak is: a shared machine only ever makes it slower.
  For bfloat16 both a bfloat16 and a float32-accumulated output are tried (CPU kernels
  differ by 2x between them) and the faster counts. Cached per (dtype, n) in the process;
  `again` times it once more and keeps the best of all measurements (tools/benchmark.py
  re-measures between rounds, so that one busy second at start-up does not set the peak).
  """
  if (dtype, n) in _measured and not again:
    return _measured[(dtype, n)]
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  b = jax.device_put(jnp.full((n, n), 0.5, dtype), device)
  variants = [jax.jit(lambda x, y: x @ y)]
  if dtype != "float32":
    variants.append(jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)))
  best = float("inf")
  for matmul in variants:
    matmul(a, b).block_until_ready()  # Compile.
    t_end, timed = time.perf_counter() + seconds / len(variants), 0
    while time.perf_counter() < t_end or timed < 2:
      t0 = time.perf_counter()
      matmul(a, b).block_until_ready()
      best, timed = min(best, time.perf_counter() - t0), timed + 1
  _measured[(dtype, n)] = max(_measured.get((dtype, n), 0.0), 2 * n ** 3 / best)
  return _measured[(dtype, n)]


def compute_dtype(model_config: Any) -> str:
  """'bfloat16' if any tower (or the decoder) computes or multiplies in bfloat16 (dtype or
  matmul_dtype), else 'float32': the peak MFU is measured against."""
  dtypes = {model_config[t].get(key, "float32") for t in ("image", "text", "decoder")
            if model_config.get(t) is not None for key in ("dtype", "matmul_dtype")}
  return "bfloat16" if "bfloat16" in dtypes else "float32"


def peak_flops(dtype: str, override: float | None = None, again: bool = False
               ) -> tuple[float, str]:
  """(peak FLOP/s of all devices of the job, where the figure comes from).

  `override` is config.peak_flops: one device's peak. Simulated CPU devices share the host's
  cores, so on CPU the measured figure is the host's, whatever the device count. `again`
  measures a CPU peak once more, keeping the best of all measurements.
  """
  devices = jax.devices()
  if override:
    return float(override) * len(devices), "config.peak_flops"
  kind = devices[0].device_kind
  per_chip = table_peak(kind, dtype)
  if per_chip is not None:
    return per_chip * len(devices), f"{kind} {dtype} table"
  host = measure_matmul_peak(dtype, again=again)
  return host * jax.process_count(), f"{_MEASURED} {dtype} 2048^3 matmul on {kind}"


def is_measured(source: str) -> bool:
  """Whether a peak_flops() source is a measurement (a CPU), not a table or config figure."""
  return source.startswith(_MEASURED)
