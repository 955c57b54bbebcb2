"""The entry points' allocator: glibc huge pages by default, a caching malloc when asked."""

import ctypes.util
import os
import subprocess
import sys

import pytest

from big_vlp import allocator
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)
from xla_env import xla_flags

LINUX_GLIBC_235 = allocator._with_hugepages({}) != {}  # pylint: disable=protected-access
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finder(**found):
  return lambda kind: found.get(kind)


def test_auto_prefers_jemalloc_then_tcmalloc_then_glibc_huge_pages():
  auto = {"BIG_VLP_MALLOC": "auto"}
  env = allocator.tuned_environment({"X": "1", **auto},
                                    finder(tcmalloc="libt.so", jemalloc="libj.so"))
  env.pop("BIG_VLP_MALLOC")
  assert env == {"X": "1", "LD_PRELOAD": "libj.so", "MALLOC_CONF": allocator.JEMALLOC_CONF,
                 "BIG_VLP_MALLOC_ACTIVE": "jemalloc"}
  env = allocator.tuned_environment({"LD_PRELOAD": "libother.so", **auto},
                                    finder(tcmalloc="libt.so"))
  env.pop("BIG_VLP_MALLOC")
  assert env == {"LD_PRELOAD": "libt.so:libother.so", "BIG_VLP_MALLOC_ACTIVE": "tcmalloc"}
  # A MALLOC_CONF of the user's is left as it is.
  env = allocator.tuned_environment({"MALLOC_CONF": "narenas:2", **auto},
                                    finder(jemalloc="libj.so"))
  assert env["MALLOC_CONF"] == "narenas:2"
  env = allocator.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", **auto},
                                    finder())
  if env is not None:
    env.pop("BIG_VLP_MALLOC")
  if LINUX_GLIBC_235:
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                   "BIG_VLP_MALLOC_ACTIVE": "glibc"}
  else:
    assert env is None


def test_default_is_glibc_and_explicit_choices_and_opt_outs():
  both = finder(tcmalloc="libt.so", jemalloc="libj.so")
  default = allocator.tuned_environment({}, both)
  if LINUX_GLIBC_235:  # No preload even with both installed: glibc with huge pages.
    assert default == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
                       "BIG_VLP_MALLOC_ACTIVE": "glibc"}
  else:
    assert default is None
  assert allocator.tuned_environment({"BIG_VLP_MALLOC": "tcmalloc"}, both)["LD_PRELOAD"] == \
      "libt.so"
  glibc = allocator.tuned_environment({"BIG_VLP_MALLOC": "glibc"}, both)
  assert glibc is None or "LD_PRELOAD" not in glibc
  assert allocator.tuned_environment(
      {"BIG_VLP_MALLOC": "glibc", "BIG_VLP_HUGEPAGES": "0"}, both) is None
  # Restarted already, or a malloc the user preloads: nothing changes.
  assert allocator.tuned_environment({"BIG_VLP_MALLOC_ACTIVE": "glibc"}, both) is None
  assert allocator.tuned_environment({"LD_PRELOAD": "/opt/lib/libmimalloc.so"}, both) == {
      "LD_PRELOAD": "/opt/lib/libmimalloc.so", "BIG_VLP_MALLOC_ACTIVE": "custom"}


def test_bad_choices_say_what_is_allowed():
  with pytest.raises(SystemExit, match="must be one of glibc, jemalloc, tcmalloc, auto"):
    allocator.tuned_environment({"BIG_VLP_MALLOC": "tcmaloc"}, finder())
  with pytest.raises(SystemExit, match="apt-get install libtcmalloc-minimal4"):
    allocator.tuned_environment({"BIG_VLP_MALLOC": "tcmalloc"}, finder(jemalloc="libj.so"))
  with pytest.raises(SystemExit, match="no such file"):
    allocator.tuned_environment({"BIG_VLP_MALLOC": "/nonexistent/libtcmalloc.so"}, finder())


def _run(code, **env_overrides):
  env = allocator.without_settings(dict(os.environ))
  env.update(env_overrides)
  return subprocess.run([sys.executable, "-c", code], env=env, text=True, cwd=ROOT,
                        capture_output=True, timeout=120, check=True).stdout


RESTART = "from big_vlp import allocator; allocator.restart_with_allocator(); "


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_process_restarts_once_with_the_library_preloaded():
  # zlib stands in for an allocator here: a real library that python does not load at
  # start-up, so finding it mapped shows the restart preloaded it.
  libz = ctypes.util.find_library("z")
  if libz is None:
    pytest.skip("no libz to preload")
  path = next((os.path.join(d, libz) for d in ("/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64",
               "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib")
               if os.path.isfile(os.path.join(d, libz))), None)
  if path is None:
    pytest.skip(f"{libz} not in the usual library folders")
  out = _run(RESTART + "import os; print(os.getpid(), os.environ['LD_PRELOAD'], "
             "allocator.active(), any('libz' in l for l in open('/proc/self/maps')))",
             BIG_VLP_MALLOC=path).split()
  assert out[1:] == [path, "custom", "True"]
  # The restart keeps the PID (exec), so a parent waiting on it is unaffected.
  out = _run(RESTART + "import os; print(allocator.describe())", BIG_VLP_MALLOC="glibc")
  assert out.startswith("malloc glibc")


FAULTS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def cycle():  # As XLA:CPU's temporaries: one large block, written, freed.
  p = libc.malloc(256 << 20); ctypes.memset(p, 1, 256 << 20); libc.free(p)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  cycle()
print(allocator.active(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


@pytest.mark.parametrize("kind", ["jemalloc", "tcmalloc"])
def test_a_caching_malloc_reuses_a_freed_large_block(kind):
  """What the preload is for: XLA:CPU's per-step block is freed and allocated again every
  step; glibc maps it anew (65k page faults per 256 MiB on 4 KiB pages, 128 at least on 2 MiB
  huge pages), a caching malloc reuses it (none)."""
  if allocator.find_library(kind) is None:
    pytest.skip(f"{kind} not installed (Debian/Ubuntu: {allocator.INSTALL_HINT[kind]})")
  name, faults = _run(RESTART + FAULTS, BIG_VLP_MALLOC=kind).split()
  assert name == kind and int(faults) < 32, faults
  name, faults = _run(RESTART + FAULTS, BIG_VLP_MALLOC="glibc").split()
  assert name == "glibc" and int(faults) >= 128, faults


def test_trainer_runs_under_the_caching_malloc_it_finds(tmp_path, shapes_dir):
  """The whole trainer (tf.data, XLA, orbax) after the restart with the preload."""
  kind = next((k for k in allocator.LIBRARIES if allocator.find_library(k)), None)
  if kind is None:
    pytest.skip("no caching malloc installed (Debian/Ubuntu: libjemalloc2)")
  env = allocator.without_settings(dict(os.environ))
  env.update(BIG_VLP_MALLOC="auto", JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(1))
  proc = subprocess.run(
      [sys.executable, "-m", "big_vlp.train",
       f"--config=configs/demo.py:runlocal,steps=3,batch=16,data={SMALL},"
       f"data_dir={shapes_dir},tokenizer=bytes,eval_data=none,retrieval_data=none",
       f"--workdir={tmp_path / 'run'}", "--config.log_every=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f"malloc {kind}, LD_PRELOAD=" in proc.stdout
  assert (tmp_path / "run" / "metrics.jsonl").exists()
