"""XLA flags of the test processes: simulated devices, and cheap compilation.

The tests compile hundreds of small programs and run each for a few steps, so LLVM's
optimisation of XLA:CPU's generated loops costs far more than it saves: on
test_other_optimizers_learn, 44 -> 25 s wall and 59 -> 29 CPU-seconds. The matmuls run in
precompiled library kernels either way, and HLO-level optimisation and fusion are not
affected. test_learning (150 full demo steps, where running costs more than compiling)
keeps the default; the tests of the benchmark tools use these flags too, since they check
the tools' output, not their timings. BIG_VLP_TEST_XLA_OPT=full turns this off, to run the
suite with the code generation users get.
"""

import os

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def fast_compile() -> bool:
  """Whether the test processes compile with FAST_COMPILE."""
  return os.environ.get("BIG_VLP_TEST_XLA_OPT", "fast") != "full"


def xla_flags(devices: int | None = None, base: str = "") -> str:
  """XLA_FLAGS for a test process (or a training subprocess): `base`, `devices` simulated
  CPU devices (None: the default, one) and FAST_COMPILE unless turned off."""
  flags = base.split()
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  if fast_compile():
    flags += [f for f in FAST_COMPILE if f not in flags]
  return " ".join(flags)
