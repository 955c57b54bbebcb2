"""Matmul speed of XLA:CPU, the kernels under every big_vlp step, beside PyTorch's.

  python tools/benchmark_gemm.py
  python tools/benchmark_gemm.py --compare torch --rounds 3
  python tools/benchmark_gemm.py --shapes 1568x384x384,2048x2048x2048 --dtypes bfloat16
  python tools/benchmark_gemm.py --shapes 48x196x64x196 --compare torch

Each shape MxKxN is one [M, K] @ [K, N] matmul, and BxMxKxN a batch of B independent ones
([B, M, K] @ [B, K, N]), timed as a jitted `jnp.matmul` with float32 results: float32
operands, or bfloat16 operands with float32 sums (what `matmul_dtype='bfloat16'` runs,
models/matmul.py and models/attention.py). The default shapes are the Dense layers of the
ViT-S/16 step at batch 8 (8 x 196 tokens, width 384, MLP 1536), its attention's two batched
dots (8 examples x 6 heads, 196 tokens, head width 64: scores Q K^T and weighted values
P V), and the 2048^3 matmul whose speed is the CPU peak MFU is measured against
(big_vlp.perf).

`--compare torch` times the same matmuls in PyTorch (the python of
`bash tools/install_open_clip.sh`'s environment, or --open_clip_python) in alternating rounds
of one run: float32 as float32, bfloat16 as a bfloat16 @ bfloat16 product with a bfloat16
result, which is what torch.autocast(bfloat16) runs for a Linear layer or a batched
`torch.bmm`. The ratio is
XLA's GFLOP/s over PyTorch's, as a median over rounds and per round (adjacent in time).
It bounds what a train step built on these kernels can reach against open_clip's.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_SHAPES = ("1568x384x384,1568x384x1536,1568x1536x384,48x196x64x196,48x196x196x64,"
                  "2048x2048x2048")
DTYPES = ("float32", "bfloat16")


def parse_shapes(raw: str) -> list[tuple[int, ...]]:
  """'1568x384x384,48x196x64x196' -> [(1568, 384, 384), (48, 196, 64, 196)]."""
  shapes = []
  for item in raw.split(","):
    dims = item.strip().lower().split("x")
    if len(dims) not in (3, 4) or not all(d.isdigit() and int(d) > 0 for d in dims):
      raise argparse.ArgumentTypeError(
          f"{item!r} is not MxKxN or BxMxKxN with positive integers (e.g. 1568x384x384, "
          "48x196x64x196)")
    shapes.append(tuple(int(d) for d in dims))
  return shapes


def operand_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(M, K, N) -> ([M, K], [K, N]); (B, M, K, N) -> ([B, M, K], [B, K, N])."""
  *batch, m, k, n = shape
  return (*batch, m, k), (*batch, k, n)


def parse_dtypes(raw: str) -> list[str]:
  names = [d.strip() for d in raw.split(",")]
  bad = [d for d in names if d not in DTYPES]
  if bad:
    raise argparse.ArgumentTypeError(f"{', '.join(bad)}: allowed values are {', '.join(DTYPES)}")
  return names


def key(dtype: str, shape: tuple[int, ...]) -> str:
  return f"{dtype} {'x'.join(map(str, shape))}"


def flops(shape: tuple[int, ...]) -> int:
  """2 B M K N (B = 1 for a plain matmul)."""
  return 2 * math.prod(shape)


def median_seconds(call, reps: int) -> float:
  """Median wall time of `call()` over `reps` calls after two untimed ones."""
  call()
  call()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def xla_rates(shapes, dtypes, reps: int, seed: int = 0) -> dict[str, float]:
  """GFLOP/s of a jitted jnp.matmul (float32 results) per dtype and shape."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  dot = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  rng = np.random.default_rng(seed)
  out = {}
  for dtype in dtypes:
    for shape in shapes:
      a, b = (jnp.asarray(rng.standard_normal(s, np.float32), dtype)
              for s in operand_shapes(shape))
      seconds = median_seconds(lambda: dot(a, b).block_until_ready(), reps)
      out[key(dtype, shape)] = flops(shape) / seconds / 1e9
  return out


def torch_rates(shapes, dtypes, reps: int, threads: int | None) -> dict[str, float]:
  """GFLOP/s of torch's `a @ b` (bfloat16 result for bfloat16 operands); runs in the torch
  environment (the --worker mode of this file)."""
  import torch  # pylint: disable=import-outside-toplevel

  if threads:
    torch.set_num_threads(threads)
  gen = torch.Generator().manual_seed(0)
  out = {}
  for dtype in dtypes:
    for shape in shapes:
      a, b = (torch.randn(s, generator=gen).to(getattr(torch, dtype))
              for s in operand_shapes(shape))
      seconds = median_seconds(lambda: a @ b, reps)
      out[key(dtype, shape)] = flops(shape) / seconds / 1e9
  out["threads"] = torch.get_num_threads()
  out["torch"] = torch.__version__
  return out


def run_torch_round(python: str, args: argparse.Namespace) -> dict[str, float]:
  spec = {"shapes": args.shapes, "dtypes": args.dtypes, "reps": args.reps,
          "threads": args.threads}
  proc = subprocess.run([python, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                        capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0:
    raise SystemExit(f"the torch worker ({python}) failed:\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    spec = json.loads(sys.argv[2])
    shapes = [tuple(s) for s in spec["shapes"]]
    print(json.dumps(torch_rates(shapes, spec["dtypes"], spec["reps"], spec["threads"])))
    return

  # The trainer's allocator (big_vlp.allocator); the torch worker inherits it.
  from big_vlp import allocator  # pylint: disable=import-outside-toplevel
  from open_clip_env import find_open_clip_python  # pylint: disable=import-outside-toplevel
  allocator.restart_with_allocator()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                      help=f"comma-separated MxKxN or BxMxKxN (default {DEFAULT_SHAPES})")
  parser.add_argument("--dtypes", type=parse_dtypes, default=list(DTYPES),
                      help="comma-separated: float32, bfloat16 (default both)")
  parser.add_argument("--reps", type=int, default=20, help="timed calls per matmul")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--compare", choices=("torch",))
  parser.add_argument("--open_clip_python",
                      help="python of an environment with PyTorch (default: open_clip's)")
  parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()
  if args.reps < 1 or args.rounds < 1:
    parser.error("--reps and --rounds must be at least 1")
  python = (find_open_clip_python(args.open_clip_python, "--compare torch")
            if args.compare else None)

  import jax  # pylint: disable=import-outside-toplevel
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPU "
        f"cores; jax {jax.__version__}", flush=True)
  rounds: dict[str, list[dict[str, float]]] = {"xla": [], "torch": []}
  for r in range(args.rounds):
    rounds["xla"].append(xla_rates(args.shapes, args.dtypes, args.reps))
    if python:
      rounds["torch"].append(run_torch_round(python, args))
    print(f"round {r + 1}/{args.rounds} done", flush=True)

  keys = [key(d, s) for d in args.dtypes for s in args.shapes]
  results = {"shapes": [list(s) for s in args.shapes], "dtypes": args.dtypes,
             "reps": args.reps, "rounds": args.rounds, "rows": []}
  if python:
    results["torch"] = rounds["torch"][0]["torch"]
    results["torch_threads"] = rounds["torch"][0]["threads"]
    print(f"torch {results['torch']}, {results['torch_threads']} threads")
  header = f"\n{'matmul':30s} {'XLA GFLOP/s':>12s}"
  if python:
    header += f" {'torch GFLOP/s':>14s} {'XLA / torch':>12s}  per round"
  print(header)
  for k in keys:
    ours = [rd[k] for rd in rounds["xla"]]
    row = {"matmul": k, "xla_gflops": statistics.median(ours), "xla_round_gflops": ours}
    line = f"{k:30s} {row['xla_gflops']:12.0f}"
    if python:
      theirs = [rd[k] for rd in rounds["torch"]]
      per_round = [o / t for o, t in zip(ours, theirs)]
      row.update(torch_gflops=statistics.median(theirs), torch_round_gflops=theirs,
                 ratio=statistics.median(ours) / statistics.median(theirs),
                 round_ratios=per_round)
      line += (f" {row['torch_gflops']:14.0f} {row['ratio']:11.2f}x  "
               f"{min(per_round):.2f}-{max(per_round):.2f}x")
    results["rows"].append(row)
    print(line)
  print(f"\nmedians of {args.rounds} rounds of {args.reps} calls each; XLA: jitted jnp.matmul "
        "with float32 results" + ("; torch: a @ b in the operands' dtype" if python else ""))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
