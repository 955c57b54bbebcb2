"""Compiled per-device memory of the global contrastive losses vs the sharded ones.

  python tools/benchmark_memory.py [--devices 1,2,4,8] [--per_device_batch 4096] \
      [--dim 768] [--losses sigmoid,softmax] [--json PATH] [--forward_only]

For each loss and device count n, the train-step part of the loss (forward + backward:
`jax.value_and_grad` w.r.t. the embeddings, the scale and, for sigmoid, the bias) is
jitted over a 1-axis mesh ('data',) of n simulated CPU devices, with the embeddings
[B, dim] float32 split over the batch (B = per_device_batch * n, so each device always
holds the same b rows). It is only lowered and compiled, never run: no array of that size
is ever allocated. The figures come from `compiled.memory_analysis()`, which for an SPMD
executable describes one device's program:

  temp    XLA's scratch buffers: the loss's working memory (logits blocks and their
          gradients live here).
  total   temp + arguments + outputs, an estimate of the peak per device.

Implementations:

  naive   `big_vlp.losses.sigmoid_loss` / `softmax_loss` on the global batch; XLA's
          GSPMD partitioner decides how to split the B x B logits.
  ring    `big_vlp.losses_sharded.ring_sigmoid_loss` / `ring_softmax_loss` with
          axes=('data',): shard_map, b x b blocks on a ring in both passes (custom_vjp).
  gather  softmax only: `big_vlp.losses_sharded.gather_softmax_loss`, b x B rows after an
          all-gather of each tower.

At a fixed b the ring versions' temp stays flat in n (they hold a couple of b x b blocks and
a few b x D buffers, whatever n), while naive and gather grow linearly (b x B rows).

--forward_only compiles the loss without its gradient, to tell the forward pass's working
memory from what the backward pass adds (for naive and gather: the b x B residuals that
reverse mode keeps; for the rings: a second pass over the ring).
"""

import argparse
import json
import os
import shlex
import sys
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MiB = 1024 * 1024
# The implementations measured per loss.
IMPLS = {"sigmoid": ("naive", "ring"), "softmax": ("naive", "gather", "ring")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line flags."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,2,4,8",
                      help="comma-separated device counts n")
  parser.add_argument("--per_device_batch", type=int, default=4096,
                      help="rows per device b; the global batch is b * n")
  parser.add_argument("--dim", type=int, default=768, help="embedding width")
  parser.add_argument("--losses", default="sigmoid,softmax",
                      help="comma-separated losses: sigmoid, softmax")
  parser.add_argument("--json", default=None, help="also write the rows to this file")
  parser.add_argument("--forward_only", action="store_true",
                      help="compile the loss alone instead of value_and_grad, to separate "
                      "the forward's memory from the backward's")
  args = parser.parse_args(argv)
  args.devices = [int(d) for d in args.devices.split(",") if d]
  args.losses = [name for name in args.losses.split(",") if name]
  if not args.devices or min(args.devices) < 1:
    parser.error("--devices needs positive device counts")
  unknown = sorted(set(args.losses) - {"sigmoid", "softmax"})
  if unknown or not args.losses:
    parser.error(f"--losses must be from sigmoid,softmax; got {args.losses}")
  return args


def set_up_devices(count: int) -> None:
  """Asks for `count` simulated CPU devices; must run before jax is imported."""
  if "jax" in sys.modules:
    raise RuntimeError("set_up_devices must run before jax is imported")
  flag = f"--xla_force_host_platform_device_count={count}"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def loss_fn(name: str, impl: str, mesh: Any) -> tuple[Callable[..., Any], int]:
  """The loss as f(zimg, ztxt, scale[, bias]) and its number of arguments."""
  # pylint: disable=import-outside-toplevel
  from big_vlp import losses, losses_sharded
  if impl not in IMPLS[name]:
    raise ValueError(f"no impl {impl!r} for loss {name!r}; allowed: {IMPLS[name]}")
  axes = ("data",)
  if name == "sigmoid":
    if impl == "naive":
      return losses.sigmoid_loss, 4
    return (lambda x, y, s, b: losses_sharded.ring_sigmoid_loss(
        x, y, s, b, mesh=mesh, axes=axes)), 4
  if impl == "naive":
    return losses.softmax_loss, 3
  sharded = {"gather": losses_sharded.gather_softmax_loss,
             "ring": losses_sharded.ring_softmax_loss}[impl]
  return (lambda x, y, s: sharded(x, y, s, mesh=mesh, axes=axes)), 3


def measure(name: str, impl: str, devices: int, per_device_batch: int, dim: int,
            forward_only: bool = False) -> dict[str, Any]:
  """Compiles value_and_grad of one loss (or the loss alone) on `devices` devices."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

  if len(jax.devices()) < devices:
    raise RuntimeError(f"asked for {devices} devices but jax has {len(jax.devices())}")
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",), axis_types=(AxisType.Auto,))
  batch = per_device_batch * devices
  rows = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  fn, nargs = loss_fn(name, impl, mesh)
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
  args = (emb, emb) + (scalar,) * (nargs - 2)
  in_shardings = (rows, rows) + (replicated,) * (nargs - 2)
  if forward_only:
    step = jax.jit(fn, in_shardings=in_shardings, out_shardings=replicated)
  else:
    step = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(nargs))),
                   in_shardings=in_shardings, out_shardings=(replicated, in_shardings))
  mem = step.lower(*args).compile().memory_analysis()
  temp = int(mem.temp_size_in_bytes)
  argument = int(mem.argument_size_in_bytes)
  output = int(mem.output_size_in_bytes)
  # memory_analysis must describe one device: its arguments are this device's shards.
  expected_args = 2 * per_device_batch * dim * 4 + 4 * (nargs - 2)
  if argument != expected_args:
    raise RuntimeError(f"{name}/{impl}/n={devices}: argument_size_in_bytes={argument}, "
                       f"expected the per-device shards' {expected_args}")
  return {"loss": name, "impl": impl, "devices": devices, "global_batch": batch,
          "per_device_batch": per_device_batch, "dim": dim,
          "mode": "forward" if forward_only else "value_and_grad", "temp_bytes": temp,
          "argument_bytes": argument, "output_bytes": output,
          "total_bytes": temp + argument + output}


def temp_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Per loss and impl: temp at the largest device count / temp at the smallest."""
  out: dict[str, dict[str, float]] = {}
  for row in rows:
    key = (row["loss"], row["impl"])
    same = [r for r in rows if (r["loss"], r["impl"]) == key]
    lo = min(same, key=lambda r: r["devices"])
    hi = max(same, key=lambda r: r["devices"])
    out.setdefault(row["loss"], {})[row["impl"]] = (
        hi["temp_bytes"] / lo["temp_bytes"] if lo["temp_bytes"] else float("nan"))
  return out


def format_table(rows: list[dict[str, Any]]) -> str:
  """The rows as a markdown table."""
  lines = ["| loss | impl | devices | global batch | per-device temp MiB "
           "| per-device total MiB |",
           "|---|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['loss']} | {r['impl']} | {r['devices']} | {r['global_batch']} "
                 f"| {r['temp_bytes'] / MiB:.1f} | {r['total_bytes'] / MiB:.1f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """Measures every (loss, impl, n) and prints the table and the temp ratios."""
  args = parse_args(argv)
  set_up_devices(max(args.devices))
  command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
  print(f"command: {command}\n")
  rows = []
  for name in args.losses:
    for impl in IMPLS[name]:
      for n in args.devices:
        rows.append(measure(name, impl, n, args.per_device_batch, args.dim,
                            args.forward_only))
  mode = "loss only (--forward_only)" if args.forward_only else "value_and_grad"
  print(f"compiled: {mode}, per_device_batch={args.per_device_batch}, dim={args.dim}\n")
  print(format_table(rows))
  lo, hi = min(args.devices), max(args.devices)
  ratios = temp_ratios(rows)
  print(f"\nper-device temp at n={hi} / temp at n={lo}:")
  for name, by_impl in ratios.items():
    text = ", ".join(f"{impl} {ratio:.2f}x" for impl, ratio in by_impl.items())
    print(f"  {name}: {text}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"command": command, "rows": rows, "temp_ratio_max_over_min": ratios}, f,
                indent=2)


if __name__ == "__main__":
  main()
