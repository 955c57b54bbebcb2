"""Transparent huge pages for XLA:CPU's per-step buffers, by restarting the process once.

XLA:CPU allocates each execution's temporaries afresh (hundreds of MiB to GiBs for a train
step). glibc serves allocations that large with a fresh mmap and unmaps them on free, so
every step the kernel faults in and zeroes every 4 KiB page again: on the 2-core machine of
the README, 180k page faults and a third of a second of system time per demo step, 6 GiB of
faults per ViT-S/16 step at batch 32. With glibc.malloc.hugetlb=1 (glibc >= 2.35) those
mappings ask for 2 MiB transparent huge pages: 500x fewer faults and a faster step
(README, Performance). glibc reads its tunables only at start-up, so the entry points
(`python -m big_vlp.train`, `big_vlp.evaluate`, tools/benchmark.py) restart themselves once
with the tunable set, before importing anything heavy. exec keeps the PID, so a parent
waiting on the process or signalling it is unaffected. BIG_VLP_HUGEPAGES=0 turns this off.
"""

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "BIG_VLP_HUGEPAGES"


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (ValueError, OSError, AttributeError):
    return None


def tuned_environment(env: dict[str, str]) -> dict[str, str] | None:
  """The environment to restart with, or None when no restart is wanted."""
  if env.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
    return None
  version = _glibc_version()
  current = env.get("GLIBC_TUNABLES", "")
  if version is None or version < (2, 35) or TUNABLE in current:
    return None
  return {**env, "GLIBC_TUNABLES": f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"}


def restart_with_hugepages() -> None:
  """Re-executes this very command line (same PID) with the tunable set; returns if not."""
  env = tuned_environment(dict(os.environ))
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":  # `python -m big_vlp.hugepages`: shows what a run would get.
  restart_with_hugepages()
  print(os.environ.get("GLIBC_TUNABLES", ""))
