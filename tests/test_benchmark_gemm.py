"""tools/benchmark_gemm.py: XLA:CPU matmul speed, and PyTorch's beside it when installed."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "benchmark_gemm.py")
SHAPES = "48x32x16,8x24x40,3x8x24x40"  # Two plain matmuls and a batch of three.


def run_tool(tmp_path, *extra):
  out = tmp_path / "gemm.json"
  proc = subprocess.run(
      [sys.executable, TOOL, "--shapes", SHAPES, "--reps", "2", "--json", str(out), *extra],
      capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout, json.loads(out.read_text())


def test_gemm_xla_half_times_every_shape_and_dtype(tmp_path):
  stdout, res = run_tool(tmp_path, "--rounds", "2")
  assert res["shapes"] == [[48, 32, 16], [8, 24, 40], [3, 8, 24, 40]]
  assert res["dtypes"] == ["float32", "bfloat16"] and res["rounds"] == 2
  names = [row["matmul"] for row in res["rows"]]
  assert names == ["float32 48x32x16", "float32 8x24x40", "float32 3x8x24x40",
                   "bfloat16 48x32x16", "bfloat16 8x24x40", "bfloat16 3x8x24x40"]
  for row in res["rows"]:
    assert len(row["xla_round_gflops"]) == 2 and all(g > 0 for g in row["xla_round_gflops"])
    assert min(row["xla_round_gflops"]) <= row["xla_gflops"] <= max(row["xla_round_gflops"])
    assert "torch_gflops" not in row
    assert row["matmul"] in stdout


def test_gemm_compare_without_torch_says_how_to_install(tmp_path):
  if os.path.exists(os.path.join(ROOT, ".venv-open_clip", "bin", "python")):
    pytest.skip("an open_clip environment exists in the checkout")
  proc = subprocess.run(
      [sys.executable, TOOL, "--compare", "torch", "--open_clip_python",
       str(tmp_path / "missing" / "python")], capture_output=True, text=True, timeout=300,
      env={**{k: v for k, v in os.environ.items() if k != "BIG_VLP_OPEN_CLIP_PYTHON"},
           "XLA_FLAGS": ""}, cwd=str(tmp_path))
  assert proc.returncode != 0 and "no open_clip environment found" in proc.stderr
  assert "--compare torch" in proc.stderr and "install_open_clip.sh" in proc.stderr


@pytest.mark.parametrize("flag,value,message", [
    ("--shapes", "48x32", "'48x32' is not MxKxN"),
    ("--shapes", "48x0x16", "'48x0x16' is not MxKxN"),
    ("--shapes", "2x3x4x5x6", "'2x3x4x5x6' is not MxKxN or BxMxKxN"),
    ("--dtypes", "float16", "float16: allowed values are float32, bfloat16"),
])
def test_gemm_bad_arguments_name_the_flag(flag, value, message):
  proc = subprocess.run([sys.executable, TOOL, flag, value], capture_output=True, text=True,
                        timeout=300, env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 2 and flag in proc.stderr and message in proc.stderr


def test_gemm_torch_half(tmp_path, open_clip_python):
  stdout, res = run_tool(tmp_path, "--rounds", "1", "--dtypes", "float32", "--compare",
                         "torch", "--open_clip_python", open_clip_python)
  assert res["torch"] and res["torch_threads"] >= 1
  for row in res["rows"]:
    assert row["torch_gflops"] > 0
    assert row["ratio"] == pytest.approx(row["xla_gflops"] / row["torch_gflops"])
    assert row["round_ratios"] == [pytest.approx(row["ratio"])]
  assert "XLA / torch" in stdout
