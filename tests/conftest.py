"""Test set-up: 8 simulated CPU devices and cheap compilation (tests/xla_env.py), set before
jax is imported anywhere."""

import os
import tempfile

from xla_env import xla_flags

# Inherited by the subprocesses that do not set their own (see xla_env for the helper).
os.environ["XLA_FLAGS"] = xla_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session, inherited by the training
# subprocesses (multi-host, fault injection, preemption tests restart the same small job
# many times) and shared by the xdist workers of one run (both build the module fixtures
# and the same small configs); cached executables are the same code, so bitwise checks
# are unaffected.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN and _RUN.isalnum():
  _CACHE = os.path.join(tempfile.gettempdir(), f"big_vlp_test_xla_cache_{_RUN}")
  os.makedirs(_CACHE, exist_ok=True)
else:
  _CACHE = tempfile.mkdtemp(prefix="big_vlp_test_xla_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
# Every program, not only those that take over a second to compile: a training subprocess
# compiles dozens of small ones (evaluators, metrics, initialisation), the same in every run
# of a small config. Measured on a FILIP demo run with a warm cache: 19 -> 15 s.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import importlib.util  # pylint: disable=wrong-import-position

import pytest  # pylint: disable=wrong-import-position

_TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Tests marked `long` run first (a stable sort keeps the rest in file order).

  With `-n 2 --dist worksteal` a long test that starts near the end leaves the other worker
  idle for its whole length; started first, the short tests fill the other worker meanwhile
  and are shared out at the end. A long test should use no module-scoped fixture that the
  rest of its file uses too: moving it away from its file would set that fixture up twice.
  """
  items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture
def open_clip_python() -> str:
  """The python of the PyTorch + open_clip environment, found as the tools find it
  (tools/open_clip_env.py); skips the test when there is none: the comparison halves of
  the benchmarks are optional."""
  spec = importlib.util.spec_from_file_location(
      "open_clip_env", os.path.join(_TOOLS, "open_clip_env.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  path = module.open_clip_python()
  if path is None:
    pytest.skip("PyTorch / open_clip is not installed (bash tools/install_open_clip.sh, or "
                "set BIG_VLP_OPEN_CLIP_PYTHON); the comparison half is optional")
  return path
