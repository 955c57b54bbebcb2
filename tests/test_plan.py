"""tools/plan.py compiles the real train step for a config on N simulated devices."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_small_config_fsdp_and_fit_verdict(tmp_path):
  out = tmp_path / "plan.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # A tiny HBM so that the verdict is "does not fit" (exit status 1).
  r = subprocess.run(
      [sys.executable, "tools/plan.py", "--config", "configs/demo.py:runlocal",
       "--devices", "8", "--hbm_gib", "0.001", "--config.mesh.data=1",
       "--config.mesh.fsdp=4", "--config.mesh.tensor=2", f"--json={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stdout + r.stderr
  assert "DOES NOT FIT" in r.stdout
  p = json.loads(out.read_text())
  assert p["devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert p["per_device_batch"] == 32 // 4
  b = p["bytes_per_device"]
  replicated = 4 * p["parameters"]  # float32, a full copy per device
  # Width over fsdp=4 and heads / MLP units over tensor=2: most bytes are split 4 or 8 ways.
  assert replicated / 8 < b["params"] < replicated / 3
  assert b["optimizer"] > b["params"]  # Adam: two moments like the params, plus counts.
  assert b["temporaries"] > 0 and b["peak"] > b["params"] + b["optimizer"]
  assert b["peak"] > 0.001 * 2 ** 30 and not p["fits"]
  assert p["flops_per_device_per_step"] > 0
