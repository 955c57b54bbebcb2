"""The entry points restart once with glibc's malloc asking for transparent huge pages."""

import os
import subprocess
import sys

import pytest

from big_vlp import hugepages


def test_tuned_environment_appends_once_and_can_be_turned_off():
  if hugepages.tuned_environment({}) is None:
    pytest.skip("not Linux with glibc >= 2.35")
  assert hugepages.tuned_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  env = hugepages.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "X": "1"}
  assert hugepages.tuned_environment(env) is None  # Already set: no second restart.
  assert hugepages.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert hugepages.tuned_environment({"BIG_VLP_HUGEPAGES": "0"}) is None


@pytest.mark.parametrize("opt_out", [False, True])
def test_process_restarts_with_the_tunable(opt_out):
  if hugepages.tuned_environment({}) is None:
    pytest.skip("not Linux with glibc >= 2.35")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if opt_out:
    env["BIG_VLP_HUGEPAGES"] = "0"
  out = subprocess.run([sys.executable, "-m", "big_vlp.hugepages"], env=env, text=True,
                       capture_output=True, timeout=60, check=True).stdout
  assert out.strip() == ("" if opt_out else "glibc.malloc.hugetlb=1")
