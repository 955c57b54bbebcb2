"""Plan a pod run without the pod: compile the train step ahead of time on N simulated devices.

  python tools/plan.py --config configs/siglip_b16.py --devices 256 --hbm_gib 16
  python tools/plan.py --config configs/siglip_b16.py --devices 256 --hbm_gib 16 \
      --config.mesh.fsdp=64 --config.mesh.data=4 --config.model.image.remat=full

The config is the one `big_vlp.train` would run (same `--config` syntax and overrides). The
step is lowered and compiled exactly as training jits it (mesh, shardings, loss_impl,
accum_steps, remat, dtypes), with abstract inputs: nothing is allocated and no data is read.
Printed per device: parameter, optimizer and batch bytes (from the shardings), the compiled
program's temporaries (activations, gradients, collectives' buffers: XLA's memory analysis),
the peak estimate and whether it fits `--hbm_gib`, and the compiled FLOPs per step.

The compiler here is XLA:CPU, not the TPU/GPU compiler, so fusion and scheduling (and hence
the temporaries) differ somewhat from the real accelerator; treat the peak as an estimate
and keep some headroom. Exit status: 0 if it fits, 1 if not.
"""

import json
import os
import sys
import time


def _devices_from_argv(argv: list[str]) -> int:
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
    if a == "--devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


# The simulated device count must be set before JAX starts its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                           f"device_count={_devices_from_argv(sys.argv)}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from absl import app, flags
from ml_collections import config_flags

import jax
import numpy as np
from jax.sharding import NamedSharding

from big_vlp import config_validation, sharding, train_step
from big_vlp.run_setup import (PhasedSteps, image_size_of, make_run_spec,
                               recipe_batch_shapes, text_len_of, vocab_size_of)

GIB = 2 ** 30
def _bytes_per_device(tree, shardings) -> int:
  leaves = jax.tree.leaves(tree)
  shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  return sum(int(np.prod(s.shard_shape(tuple(a.shape)))) * np.dtype(a.dtype).itemsize
             for a, s in zip(leaves, shs))


def plan(config, num_devices: int, hbm_gib: float, image_size: int | None = None,
         vocab_size: int | None = None) -> dict:
  """Compiles the train step for `config` on the simulated devices; returns the figures."""
  config_validation.validate_config(config, num_devices)
  mesh = sharding.mesh_from_config(config, jax.devices()[:num_devices])
  res = image_size or image_size_of(config)
  vocab = vocab_size or vocab_size_of(config.tokenizer)
  text_len = text_len_of(config)
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, res, res, 3), np.float32),
           "text": jax.ShapeDtypeStruct((config.batch_size, text_len), np.int32),
           **recipe_batch_shapes(config, config.batch_size)}
  spec = make_run_spec(config, mesh, vocab, batch)
  step = PhasedSteps(config, spec, mesh, tuple(batch)).for_step(1)
  data_sh = sharding.batch_sharding(mesh)
  batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sh)
               for k, v in batch.items()}
  t0 = time.perf_counter()
  compiled = step.lower(spec.abstract_state, batch_abs).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state = spec.abstract_state
  params_b = _bytes_per_device(state["params"], spec.shardings["params"])
  opt_b = _bytes_per_device(state["opt_state"], spec.shardings["opt_state"])
  batch_b = sum(int(np.prod(data_sh.shard_shape(v.shape))) * np.dtype(v.dtype).itemsize
                for v in batch.values())
  # The state is donated: its outputs reuse the argument buffers (alias bytes).
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state["params"]))
  text = config.model.get("text") or config.model.get("decoder")  # CapPa: the decoder.
  return {
      "config": {"loss": config.loss, "loss_impl": config.get("loss_impl", "global"),
                 "accum_steps": config.get("accum_steps", 1), "batch_size": config.batch_size,
                 "image_size": res, "text_len": text_len, "vocab_size": vocab,
                 "image_remat": str(config.model.image.get("remat", "none")),
                 "text_remat": str(text.get("remat", "none")),
                 "scan": bool(config.model.image.get("scan", False)
                              or text.get("scan", False))},
      "devices": num_devices, "mesh": dict(mesh.shape), "parameters": n_params,
      "per_device_batch": config.batch_size // sharding.data_parallel_size(mesh),
      "bytes_per_device": {
          "params": params_b, "optimizer": opt_b, "batch": batch_b,
          "temporaries": mem.temp_size_in_bytes, "arguments": mem.argument_size_in_bytes,
          "outputs": mem.output_size_in_bytes, "aliased": mem.alias_size_in_bytes,
          "peak": peak},
      "flops_per_device_per_step": float(cost.get("flops", 0.0)) if cost else None,
      "hbm_gib": hbm_gib, "fits": peak <= hbm_gib * GIB, "compile_s": compile_s,
  }


def report(p: dict) -> str:
  """Human-readable summary of a plan."""
  b = p["bytes_per_device"]
  gib = lambda x: f"{x / GIB:8.3f} GiB"
  c = p["config"]
  lines = [
      f"mesh {p['mesh']} on {p['devices']} simulated devices; {p['parameters']:,} parameters",
      f"batch {c['batch_size']:,} ({p['per_device_batch']} per data-parallel shard), "
      f"{c['image_size']} px, {c['text_len']} tokens, loss {c['loss']} "
      f"({c['loss_impl']}), accum_steps {c['accum_steps']}, remat image={c['image_remat']} "
      f"text={c['text_remat']}",
      "per device:",
      f"  parameters       {gib(b['params'])}",
      f"  optimizer state  {gib(b['optimizer'])}",
      f"  batch            {gib(b['batch'])}",
      f"  temporaries      {gib(b['temporaries'])}   (activations, gradients, buffers)",
      f"  peak estimate    {gib(b['peak'])}   of {p['hbm_gib']:g} GiB HBM: "
      + ("fits" if p["fits"] else "DOES NOT FIT"),
  ]
  if p["flops_per_device_per_step"]:
    lines.append(f"  compiled FLOPs   {p['flops_per_device_per_step']:.3e} per step"
                 + ("   (XLA counts a scanned layer loop once: plan with scan=False for "
                    "the full count)" if c["scan"] else ""))
  lines.append(f"(compiled in {p['compile_s']:.0f}s with XLA:CPU)")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  del argv
  f = flags.FLAGS
  p = plan(f.config, f.devices, f.hbm_gib, f.image_size, f.vocab_size)
  print(report(p), flush=True)
  if f.json:
    with open(f.json, "w") as out:
      json.dump(p, out, indent=2)
  return 0 if p["fits"] else 1


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_integer("devices", 8, "Number of (simulated) devices to plan for.")
  flags.DEFINE_float("hbm_gib", 16.0, "Accelerator memory per device in GiB (v5e: 16).")
  flags.DEFINE_integer("image_size", None, "Image size (default: from the train pp).")
  flags.DEFINE_integer("vocab_size", None, "Vocabulary size (default: from the tokenizer).")
  flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: sys.exit(main(argv)))
