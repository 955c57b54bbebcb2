"""tools/benchmark.py --sweep: one run times a step per value of a config field."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from big_vlp import flops, recipes
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "benchmark.py")
CONFIG = "configs/demo.py:runlocal=True"


def demo_model() -> dict:
  """config.model of CONFIG, read here so the test checks the tool's FLOPs independently."""
  path, _, arg = CONFIG.partition(":")
  spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg).model


def test_sweep_times_each_masking_value_with_its_own_flops(tmp_path):
  out = tmp_path / "sweep.json"
  # --peak_flops skips measuring a CPU matmul peak; MFU's value is not what is tested here.
  proc = subprocess.run(
      [sys.executable, TOOL, "--config", CONFIG, "--sweep", "masking.image=0,0.5",
       "--steps", "1", "--rounds", "1", "--peak_flops", "1e12", "--json", str(out)],
      capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": xla_flags()})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  res = json.loads(out.read_text())
  assert res["sweep"] == {"field": "masking.image", "values": [0, 0.5]}
  unmasked, masked = res["variants"]
  assert (unmasked["value"], masked["value"]) == (0, 0.5)
  assert masked["phase"] == {"locked": [], "image_mask": 0.5, "text_mask": 0.0}
  # A masked step runs half the image tokens: its model FLOPs are those of its phase.
  assert masked["model_flops_per_step"] < unmasked["model_flops_per_step"]
  for entry, mask in ((unmasked, 0.0), (masked, 0.5)):
    count = flops.two_tower_flops(demo_model(), (64, 64, 3), 16, entry["batch"],
                                  recipes.Phase(image_mask=mask), "pooled")
    assert entry["model_flops_per_step"] == count.train_per_step
    assert entry["step_s"] > 0 and entry["compile_s"] > 0 and len(entry["round_step_s"]) == 1
    assert entry["mfu"] == pytest.approx(count.train_per_step / entry["step_s"] / 1e12)
  assert unmasked["speedup"] == 1.0 and unmasked["round_speedups"] == [1.0]
  assert masked["round_speedups"] == pytest.approx(
      [unmasked["round_step_s"][0] / masked["round_step_s"][0]])
  assert masked["speedup"] == pytest.approx(masked["img_per_sec"] / unmasked["img_per_sec"])
  assert "speed-up" in proc.stdout and "MFU counts each variant's own model FLOPs" in proc.stdout
  assert "speed-up of masking.image=0.5: one round" in proc.stdout


def test_sweep_with_compare_is_an_argument_error():
  proc = subprocess.run(
      [sys.executable, TOOL, "--config", CONFIG, "--sweep", "masking.image=0,0.5",
       "--compare", "open_clip"], capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": xla_flags()})
  assert proc.returncode == 2 and "--sweep and --compare cannot be combined" in proc.stderr
