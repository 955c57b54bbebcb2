"""The memory allocator of the entry points: glibc with huge pages, or a caching malloc.

XLA:CPU allocates each execution's temporaries afresh, in one block of hundreds of MiB to
GiBs for a train step, and frees it when the step ends. glibc serves a block that large
with a fresh mmap and unmaps it on free, so every step the kernel faults in and zeroes every
page again: 180k page faults and a third of a second of system time per demo step on the
README's 2-core machine, 6 GiB of faults per ViT-S/16 step at batch 32. Two remedies:

1. By default, glibc with `glibc.malloc.hugetlb=1` (glibc >= 2.35): the blocks are still
   mapped anew each step, but on 2 MiB transparent huge pages, 500x fewer faults.
2. Asked for (BIG_VLP_MALLOC), a caching allocator, preloaded: jemalloc (Debian/Ubuntu
   `libjemalloc2`), configured to keep freed memory (by default it hands blocks over 8 MiB
   back to the kernel at once) and to back it with transparent huge pages; or tcmalloc
   (`libtcmalloc-minimal4`, or gperftools' full `libtcmalloc`), which keeps freed memory
   too but on 4 KiB pages. Either gives the freed block to the next step: no faults, no
   zeroing. PyTorch's CPU launcher (`torch.backends.xeon.run_cpu`) preloads the same two.
   It is not the default: it removes the system time that 1 leaves, but its step-time gain
   was within the noise of the README's machine, and it holds freed memory (+1.5 GiB at
   ViT-S/16 batch 8; at batch 32 jemalloc on huge pages grew to 11 GiB and was slower;
   README, Performance).

The dynamic loader and glibc read LD_PRELOAD and GLIBC_TUNABLES only at start-up, so the
entry points (`python -m big_vlp.train`, `big_vlp.evaluate`, tools/benchmark.py) restart
themselves once, before importing anything heavy. exec keeps the PID, so a parent waiting on
the process or signalling it is unaffected.

BIG_VLP_MALLOC picks: `glibc` (the default), `jemalloc`, `tcmalloc` (an error if not
installed), `auto` (jemalloc, else tcmalloc, else glibc), or the path of an allocator's
shared library. BIG_VLP_HUGEPAGES=0 leaves the glibc tunable out. `python -m
big_vlp.allocator` prints what a run gets.
"""

import ctypes.util
import os
import sys
from typing import Callable

CHOICE = "BIG_VLP_MALLOC"
HUGEPAGES_OPT_OUT = "BIG_VLP_HUGEPAGES"
# Set in the restarted process: which allocator it runs with, and that it must not restart.
ACTIVE = "BIG_VLP_MALLOC_ACTIVE"
TUNABLE = "glibc.malloc.hugetlb"
CHOICES = ("glibc", "jemalloc", "tcmalloc", "auto")
# ctypes.util.find_library names, best first (gperftools' minimal and full tcmalloc); the
# order of the dict is the order `auto` tries.
LIBRARIES = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc_minimal", "tcmalloc")}
# jemalloc returns blocks over oversize_threshold (8 MiB) to the kernel as soon as they are
# freed, and the rest after dirty_decay_ms: keep them all for the next step instead, on
# transparent huge pages (thp:always), as glibc's hugetlb=1 would give them.
JEMALLOC_CONF = "thp:always,oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
INSTALL_HINT = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
# The environment variables through which the allocator is set.
SETTINGS = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (ValueError, OSError, AttributeError):
    return None


def find_library(kind: str) -> str | None:
  """The shared library of `kind` ('tcmalloc' / 'jemalloc') the loader can preload, or None."""
  for name in LIBRARIES[kind]:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def _with_hugepages(env: dict[str, str]) -> dict[str, str]:
  version = _glibc_version()
  current = env.get("GLIBC_TUNABLES", "")
  if (env.get(HUGEPAGES_OPT_OUT, "1") == "0" or version is None or version < (2, 35)
      or TUNABLE in current):
    return env
  return {**env, "GLIBC_TUNABLES": f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"}


def _with_preload(env: dict[str, str], library: str, kind: str) -> dict[str, str]:
  current = env.get("LD_PRELOAD", "")
  env = {**env, "LD_PRELOAD": f"{library}:{current}" if current else library}
  if kind == "jemalloc" and "MALLOC_CONF" not in env:
    env["MALLOC_CONF"] = JEMALLOC_CONF
  return env


def _kind_of_path(path: str) -> str:
  name = os.path.basename(path)
  return next((k for k in LIBRARIES if k in name), "custom")


def _preloaded_malloc(env: dict[str, str]) -> str | None:
  """The kind of a malloc the user preloads already (LD_PRELOAD), or None."""
  for entry in env.get("LD_PRELOAD", "").replace(" ", ":").split(":"):
    if "malloc" in os.path.basename(entry):
      return _kind_of_path(entry)
  return None


def tuned_environment(env: dict[str, str],
                      find: Callable[[str], str | None] = find_library
                      ) -> dict[str, str] | None:
  """The environment to run with, or None when nothing is to change.

  It names its allocator in BIG_VLP_MALLOC_ACTIVE ('jemalloc', 'tcmalloc', 'custom' for a
  path, or 'glibc'), which also stops a second restart. A process whose LD_PRELOAD already
  holds a malloc keeps it. Raises SystemExit on a BIG_VLP_MALLOC value that cannot be
  honoured.
  """
  if ACTIVE in env or not sys.platform.startswith("linux"):
    return None
  preloaded = _preloaded_malloc(env)
  if preloaded is not None:
    return {**env, ACTIVE: preloaded}
  choice = env.get(CHOICE, "glibc").strip() or "glibc"
  if os.sep in choice:  # A path to an allocator's shared library.
    if not os.path.isfile(choice):
      raise SystemExit(f"{CHOICE}={choice}: no such file; give the path of a malloc "
                       f"shared library or one of {', '.join(CHOICES)}")
    kind = _kind_of_path(choice)
    return {**_with_preload(env, choice, kind), ACTIVE: kind}
  if choice not in CHOICES:
    raise SystemExit(f"{CHOICE}={choice!r}: must be one of {', '.join(CHOICES)}, or the path "
                     "of a malloc shared library")
  for kind in (tuple(LIBRARIES) if choice == "auto" else
               () if choice == "glibc" else (choice,)):
    library = find(kind)
    if library is not None:
      return {**_with_preload(env, library, kind), ACTIVE: kind}
    if choice != "auto":
      raise SystemExit(f"{CHOICE}={choice}: lib{LIBRARIES[choice][0]} not found by the "
                       f"dynamic loader; install it (Debian/Ubuntu: apt-get install "
                       f"{INSTALL_HINT[choice]}) or set {CHOICE} to auto or glibc")
  tuned = _with_hugepages(env)
  return None if tuned is env else {**tuned, ACTIVE: "glibc"}


def active() -> str:
  """The allocator this process runs with, as the restart set it ('glibc' without one)."""
  return os.environ.get(ACTIVE, "glibc")


def without_settings(env: dict[str, str]) -> dict[str, str]:
  """`env` without any allocator setting: what a process not started by big_vlp gets."""
  return {k: v for k, v in env.items() if k not in (*SETTINGS, ACTIVE)}


def describe() -> str:
  """One line for logs: the allocator and the environment that selects it."""
  parts = [f"malloc {active()}"]
  for key in SETTINGS:
    if os.environ.get(key):
      parts.append(f"{key}={os.environ[key]}")
  return ", ".join(parts)


def restart_with_allocator() -> None:
  """Re-executes this very command line (same PID) with the allocator set; returns if not."""
  env = tuned_environment(dict(os.environ))
  if env is None:
    return
  unchanged = {k: v for k, v in env.items() if k != ACTIVE} == dict(os.environ)
  os.environ[ACTIVE] = env[ACTIVE]
  if not unchanged:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":  # `python -m big_vlp.allocator`: shows what a run would get.
  restart_with_allocator()
  print(describe())
