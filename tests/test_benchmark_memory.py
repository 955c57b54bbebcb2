"""tools/benchmark_memory.py: compiled per-device memory of the global vs sharded losses.

The assertions are compiler facts (XLA's buffer assignment for the CPU backend), not timings.
"""

import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "benchmark_memory.py")
# At b = 512, D = 64 a b x b float32 block (1 MiB) outweighs the b x D buffers (128 KiB)
# that the ring adds for n > 1, so "flat" is a clear margin, not a rounding effect.
B, DIM = 512, 64
DEVICES = (1, 2, 4)
IMPLS = {"sigmoid": ("naive", "ring"), "softmax": ("naive", "gather", "ring")}


def run_tool(tmp_path, *extra: str) -> list[dict[str, Any]]:
  """Runs the tool on 1, 2 and 4 devices at small sizes; the rows of its JSON output."""
  out = tmp_path / "memory.json"
  cmd = [sys.executable, TOOL, "--devices", ",".join(map(str, DEVICES)),
         "--per_device_batch", str(B), "--dim", str(DIM), "--json", str(out), *extra]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "| loss | impl | devices |" in proc.stdout
  return json.loads(out.read_text())["rows"]


def temp(rows: list[dict[str, Any]], loss: str, impl: str, devices: int) -> int:
  """temp_size_in_bytes of one row."""
  (row,) = [r for r in rows if (r["loss"], r["impl"], r["devices"]) == (loss, impl, devices)]
  return row["temp_bytes"]


def test_value_and_grad_memory(tmp_path):
  """Forward + backward: the rings' per-device temp is flat in n, naive and gather grow."""
  rows = run_tool(tmp_path)
  keys = {(r["loss"], r["impl"], r["devices"]) for r in rows}
  assert keys == {(l, i, n) for l, impls in IMPLS.items() for i in impls for n in DEVICES}
  for r in rows:
    # memory_analysis is per device: the arguments are one device's shards + the scalars.
    scalars = 2 if r["loss"] == "sigmoid" else 1
    assert r["argument_bytes"] == 2 * B * DIM * 4 + 4 * scalars
    assert r["global_batch"] == B * r["devices"]
    assert r["total_bytes"] == r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"]
  for loss in IMPLS:
    # GSPMD splits the global B x B logits by rows: b x B per device, linear in n.
    assert temp(rows, loss, "naive", 4) > 2 * temp(rows, loss, "naive", 1)
    # The ring's custom_vjp keeps nothing per hop: two b x b blocks whatever n (~1.2x for
    # softmax at these sizes: the ring's b x D send/receive buffers; sigmoid is ~0.8x, as
    # at n = 1 XLA unrolls the one-trip loops, merges the forward's and the backward's
    # identical block and so keeps it alive in between: three blocks).
    for n in (2, 4):
      assert temp(rows, loss, "ring", n) <= 1.5 * temp(rows, loss, "ring", 1), (loss, n)
  # Gather-with-grad is b x B rows in both directions: linear in n like naive.
  assert temp(rows, "softmax", "gather", 4) > 2 * temp(rows, "softmax", "gather", 1)


def test_forward_memory(tmp_path):
  """--forward_only: the rings' forward alone is flat in n too; naive's grows."""
  rows = run_tool(tmp_path, "--losses", "sigmoid", "--forward_only")
  assert {r["mode"] for r in rows} == {"forward"}
  # One b x b block, plus for n > 1 the visiting text block and its receive buffer.
  assert temp(rows, "sigmoid", "ring", 4) <= 1.5 * temp(rows, "sigmoid", "ring", 1)
  assert temp(rows, "sigmoid", "naive", 4) > 3 * temp(rows, "sigmoid", "naive", 1)
