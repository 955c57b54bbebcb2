"""tools/fault_inject.py end to end: a run SIGKILLed at random moments (mid-save included)
and resumed each time ends bitwise identical to an uninterrupted one."""

import json
import os
import subprocess
import sys

import pytest

from data_fixtures import shapes_dir  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.long
def test_killed_and_resumed_run_is_bitwise_identical(tmp_path, shapes_dir):  # noqa: F811
  report_path = tmp_path / "report.json"
  cmd = [sys.executable, os.path.join(ROOT, "tools", "fault_inject.py"),
         "--workdir", str(tmp_path / "fi"), "--data_dir", shapes_dir, "--kills", "5",
         "--seed", "0", "--steps", "8", "--ckpt_every", "2", "--timeout_s", "560",
         "--json", str(report_path)]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  report = json.loads(report_path.read_text())
  attempts = report["attempts"]
  killed = [a for a in attempts if a["outcome"] == "killed"]
  assert len(killed) >= 5, out
  assert any(a["save_in_progress"] and a["tmp_dirs"] for a in killed), out
  assert report["checkpoint"]["identical"] and report["metrics"]["identical"], out
  assert report["identical"] and "IDENTICAL" in proc.stdout
  resumed = [a["resumed_from"] for a in attempts] + [a["next_resumed_from"] for a in attempts]
  assert any(r is not None and r > 0 for r in resumed), out
