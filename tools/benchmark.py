"""Train-step speed of a config: step time, img/s, MFU, compile time, peak memory.

  python tools/benchmark.py --config demo
  python tools/benchmark.py --config vit_s16 --batch 32 --compare open_clip
  python tools/benchmark.py --config configs/siglip_b16.py:runlocal=True --set model.image.dtype=bfloat16
  python tools/benchmark.py --config demo --sweep masking.image=0,0.5,0.75
  python tools/benchmark.py --config vit_s16 --batch 8 --matmul_dtype bfloat16 --compare open_clip

--config is a preset (demo: configs/demo.py; vit_s16: the demo recipe with ViT-S/16 image
and S text towers at 224 px, 64 tokens) or `configs/X.py[:args]`; --set FIELD=VALUE
overrides any field. The step is big_vlp's real train step (both towers, loss, gradients,
AdamW update) on synthetic in-memory batches of the config's shapes, so input speed does not
enter (tools/benchmark_input.py measures that).

`--sweep FIELD=V1,V2,...` times one variant of the config per value (FIELD=value, applied
after --set / --batch / --dtype; values parsed as --set parses them) in this same run: rounds
alternate over the variants, as with --compare, and the table gives each variant's median
step time, img/s, MFU, compile time and its img/s relative to the first value's (also per
round, `round_speedups` in --json, with their range printed). Each
variant's MFU counts its own model FLOPs: a FLIP-masked model (masking.image / .text) does
fewer per step, so its MFU is of the smaller model, and speed-up is the measure to read.

`--compare open_clip` builds the same two-tower architecture in open_clip (PyTorch; same
widths, depths, heads, patch and image size, text length, vocab, batch, loss, AdamW
settings) in a separate environment (`bash tools/install_open_clip.sh` makes one in
.venv-open_clip; or pass --open_clip_python) and times it in this same run: rounds of
big_vlp and open_clip steps alternate, so both see the same machine state, and the medians
over rounds are compared; each round starts with --warmup untimed steps (default 1) on
each side, so what is timed is the steady step rather than the first one after the other
framework's round. The ratio is also printed per round (`round_speedups_vs_open_clip` in
--json): each round's two figures are adjacent in time, so on a machine whose speed drifts
their range is the honest error bar of the ratio of medians. MFU of both is model FLOPs
(big_vlp.flops) over the peak the trainer uses (big_vlp.perf: the device table, or a matmul
measured here on CPU).

The open_clip worker runs under the same allocator as big_vlp (big_vlp.allocator: glibc
with huge pages by default, or the malloc BIG_VLP_MALLOC preloads), so the comparison is of
the frameworks; `--open_clip_malloc glibc` gives it plain glibc instead, as an open_clip
run gets by default, for the comparison of what each user runs. big_vlp's page faults and
system / user CPU per timed step are printed too (getrusage), the measure of the allocator.
"""

import argparse
import ast
import copy
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if __name__ == "__main__":  # The trainer's allocator (big_vlp.allocator).
  from big_vlp import allocator
  allocator.restart_with_allocator()


# pylint: disable=wrong-import-position
import jax
import numpy as np

from big_vlp import allocator, config_validation, flops, perf, recipes, sharding, train_step
from big_vlp.config_errors import ConfigError
from big_vlp.models import common
from big_vlp.run_setup import (PhasedSteps, image_size_of, make_run_spec,
                               recipe_batch_shapes, text_len_of, vocab_size_of)
from open_clip_env import find_open_clip_python

PRESETS = ("demo", "vit_s16")


def load_config(path_arg: str) -> Any:
  """`configs/x.py[:arg]` -> the ConfigDict its get_config(arg) returns."""
  path, _, arg = path_arg.partition(":")
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.exists(full):
    raise SystemExit(f"--config: {path!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                     "config file")
  spec = importlib.util.spec_from_file_location("cfg", full)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def vit_s16(config: Any, res: int = 224, text_len: int = 64) -> Any:
  """Turns a demo-style config into a ViT-S/16 image + S text two-tower at `res` px."""
  config.model.image.update(variant="S/16", width=384, depth=12, mlp_dim=1536, num_heads=6)
  config.model.text.update(variant="S", width=384, depth=12, mlp_dim=1536, num_heads=6,
                           max_len=text_len)
  config.model.embed_dim = 384
  config.data.pp = re.sub(r"resize\(\d+\)", f"resize({res})", config.data.pp)
  config.data.pp = re.sub(r"max_len=\d+", f"max_len={text_len}", config.data.pp)
  return config


def build_config(name: str) -> Any:
  """A preset or a config file."""
  if name == "demo":
    return load_config("configs/demo.py")
  if name == "vit_s16":
    return vit_s16(load_config("configs/demo.py:batch=32"))
  return load_config(name)


def parse_value(raw: str) -> Any:
  """A --set / --sweep value: the Python literal it spells, else the string itself."""
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def assign(config: Any, field: str, value: Any, flag: str = "--set") -> None:
  """Sets the dotted config field `field` (which must exist) to `value`."""
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    if part not in node:
      raise SystemExit(f"{flag}: config has no field {field!r}")
    node = node[part]
  if leaf not in node:
    raise SystemExit(f"{flag}: config has no field {field!r}")
  node[leaf] = value


def set_field(config: Any, assignment: str) -> None:
  """Applies FIELD=VALUE (VALUE parsed as a Python literal when it is one)."""
  field, sep, raw = assignment.partition("=")
  if not sep:
    raise SystemExit(f"--set {assignment!r}: expected FIELD=VALUE")
  assign(config, field, parse_value(raw))


def split_values(raw: str) -> list[str]:
  """'0,0.5,(1, 2)' -> ['0', '0.5', '(1, 2)']: commas in brackets or quotes do not split."""
  parts, depth, quote, start = [], 0, "", 0
  for i, ch in enumerate(raw):
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(raw[start:i].strip())
      start = i + 1
  parts.append(raw[start:].strip())
  return parts


def parse_sweep(arg: str) -> tuple[str, list[str]]:
  """FIELD=V1,V2,... -> (FIELD, the values as written); SystemExit when malformed."""
  field, sep, raw = arg.partition("=")
  values = split_values(raw) if sep else []
  if not field or not values or "" in values:
    raise SystemExit(f"--sweep {arg!r}: expected FIELD=V1,V2,... (one field, values "
                     "separated by commas)")
  return field, values


def step_flops(config: Any, res: int, text_len: int) -> flops.StepFlops:
  """Model FLOPs of the step the benchmark times: training step 1's phase (FLIP masking
  drops tokens, a locked tower has no backward pass), the config's similarity, its
  captioning decoder and SILC's crops."""
  try:  # The trainer's start-up checks: a bad --set / --sweep value names its field.
    config_validation.validate_config(config, jax.device_count())
    crops = recipe_batch_shapes(config, 1)  # SILC's local / global crops, as the pp has them.
  except ConfigError as e:
    raise SystemExit(f"config error: {e}") from None
  shape = lambda key: crops[key].shape[1:] if key in crops else None
  return flops.two_tower_flops(
      config.model, (res, res, 3), text_len, config.batch_size, recipes.phase_at(config, 1),
      config.get("similarity", "pooled"),
      vocab_size=vocab_size_of(config.tokenizer) if recipes.caption_on(config) else None,
      silc=(dict(recipes.setting(config, "silc", "head", {}) or {})
            if recipes.silc_on(config) else None),
      local_shape=shape(recipes.SILC_LOCAL), global_shape=shape(recipes.SILC_GLOBAL))


def synthetic_batch(batch: int, res: int, text_len: int, vocab: int, seed: int = 0,
                    extra: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
  """Images ~ N(0, 1) and token rows of random length (EOS last, then padding 0); `extra`
  shapes (run_setup.recipe_batch_shapes: SILC's crops) are filled with N(0, 1) too."""
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((batch, res, res, 3), dtype=np.float32)
  text = rng.integers(1, vocab - 1, (batch, text_len), dtype=np.int32)
  lengths = rng.integers(2, text_len + 1, batch)
  for row, n in zip(text, lengths):
    row[n - 1] = vocab - 1
    row[n:] = 0
  out = {"image": image, "text": text}
  for key, shape in (extra or {}).items():
    out[key] = rng.standard_normal(shape.shape, dtype=np.float32)
  return out


def remeasure_peak(dtype: str, override: float | None) -> tuple[float, str]:
  """The peak again, after one more measurement where it is measured (a CPU): the best of
  all measurements of this run, so that a busy second at start-up, when the peak was first
  measured, does not inflate every MFU of the run (seen: 0.107 against 0.18-0.19 TFLOP/s,
  which put MFU at 127%)."""
  peak, source = perf.peak_flops(dtype, override, again=True)
  if perf.is_measured(source):
    source += ", best of measurements between rounds"
  return peak, source


def warm_up(step: Any, steps: int) -> None:
  """Untimed steps at the start of a round: the first step after the other side's round
  pays for caches, page tables and parked threads the other process disturbed (up to 1.5x
  a steady step for big_vlp on the README's machines); both sides get the same."""
  if steps:
    step.run(steps)


class BigVlpStep:
  """big_vlp's compiled train step on one synthetic batch."""

  def __init__(self, config: Any, batch: dict[str, np.ndarray], vocab: int):
    mesh = sharding.mesh_from_config(config)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    spec = make_run_spec(config, mesh, vocab, shapes)
    self.state = train_step.init_state(spec.model, spec.tx, spec.shardings, shapes,
                                       config.seed)
    step = PhasedSteps(config, spec, mesh, tuple(shapes)).for_step(1)
    self.batch = train_step.global_batch(batch, mesh)
    self.loss = float("nan")
    t0 = time.perf_counter()
    lowered = step.lower(self.state, self.batch)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    self.run(1)
    self.first_step_s = time.perf_counter() - t0

  def run(self, steps: int) -> float:
    """Runs `steps` steps back to back (as the trainer does); returns seconds per step.

    `self.usage` is what the process spent per step meanwhile (getrusage): page faults,
    system and user CPU seconds, the measure of what the allocator costs (big_vlp.allocator).
    """
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    metrics = None
    for _ in range(steps):
      # The compiled step's third argument is a teacher's params (distillation); the
      # benchmark's step has no teacher.
      self.state, metrics = self.compiled(self.state, self.batch, None)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    self.usage = {"page_faults": (r1.ru_minflt + r1.ru_majflt - r0.ru_minflt - r0.ru_majflt)
                                 / steps,
                  "system_cpu_s": (r1.ru_stime - r0.ru_stime) / steps,
                  "user_cpu_s": (r1.ru_utime - r0.ru_utime) / steps}
    self.loss = float(metrics["loss"])
    return seconds

  def memory(self) -> dict[str, float]:
    """Compiled memory per device (arguments + outputs + temporaries), and device peak."""
    out = {}
    analysis = self.compiled.memory_analysis()
    if analysis is not None:
      out["compiled_bytes"] = float(
          analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_bytes"] = float(stats["peak_bytes_in_use"])
    out["max_rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out

  def xla_flops(self) -> float | None:
    """FLOPs XLA counts in the compiled step (all devices; a scanned body counts once)."""
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    value = (cost or {}).get("flops")
    return None if value is None else float(value) * jax.device_count()


def open_clip_spec(config: Any, res: int, vocab: int, precision: str, compile_: bool,
                   threads: int | None) -> dict[str, Any]:
  """The architecture and training settings open_clip_worker.py rebuilds."""
  image = flops.tower_size(config.model.image, "model.image")
  text = flops.tower_size(config.model.text, "model.text")
  patch = image["patch_size"]
  patch = patch[0] if isinstance(patch, (tuple, list)) else patch
  o = config.optim
  return {
      "image_size": res, "patch_size": int(patch),
      "image": {k: image[k] for k in common.SIZE_KEYS}
               | {"pool_type": config.model.image.get("pool_type", "gap")},
      "text": {k: text[k] for k in common.SIZE_KEYS}
              | {"context_length": int(config.model.text.max_len), "vocab_size": vocab,
                 "pool_type": config.model.text.get("pool_type", "last"),
                 "causal": bool(config.model.text.get("causal", False))},
      "embed_dim": int(config.model.get("embed_dim") or image["width"]),
      "batch": int(config.batch_size), "loss": config.loss,
      "optim": {"lr": float(o.lr), "wd": float(o.get("wd", 0.0)), "b1": float(o.b1),
                "b2": float(o.b2), "eps": float(o.eps),
                "grad_clip_norm": o.get("grad_clip_norm")},
      "precision": precision, "threads": threads, "seed": int(config.seed),
      "compile": compile_}


def worker_environment(env: dict[str, str], malloc: str) -> dict[str, str]:
  """The open_clip worker's environment: big_vlp's own ('same': its allocator included), or
  without the allocator settings ('glibc'), as a plain open_clip run gets."""
  return allocator.without_settings(env) if malloc == "glibc" else env


class OpenClipStep:
  """open_clip's train step, in a worker process under the open_clip environment."""

  def __init__(self, python: str, spec: dict[str, Any], malloc: str = "same"):
    self.proc = subprocess.Popen(
        [python, os.path.join(ROOT, "tools", "open_clip_worker.py"), "--spec",
         json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=worker_environment(dict(os.environ), malloc))
    self.info = self._read()
    self.loss = float("nan")
    self.max_rss_bytes = float("nan")

  def _read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      code = self.proc.wait()
      raise SystemExit(f"open_clip worker exited with status {code} (its stderr is above)")
    return json.loads(line)

  def run(self, steps: int) -> float:
    """Runs `steps` steps; returns seconds per step."""
    self.proc.stdin.write(json.dumps({"steps": steps}) + "\n")
    self.proc.stdin.flush()
    reply = self._read()
    self.loss = float(reply["loss"])
    self.max_rss_bytes = float(reply["max_rss_bytes"])
    return sum(reply["step_s"]) / steps

  def close(self) -> None:
    """Ends the worker."""
    try:
      self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
      self.proc.stdin.flush()
    except BrokenPipeError:
      pass
    self.proc.wait(timeout=60)


def round_ratios(base: list[float], other: list[float]) -> list[float]:
  """Per round, base's step time over other's: other's speed relative to base, measured
  on adjacent steps. On a shared machine whose speed drifts between rounds, their spread
  says how far to trust the ratio of medians."""
  return [b / o for b, o in zip(base, other)]


def ratio_spread(ratios: list[float]) -> str:
  """'per round 0.91-1.10x, median 1.02x' (or the one value)."""
  if len(ratios) == 1:
    return f"one round {ratios[0]:.2f}x"
  return (f"per round {min(ratios):.2f}-{max(ratios):.2f}x, median "
          f"{statistics.median(ratios):.2f}x")


def _gib(x: float) -> str:
  return f"{x / 2 ** 30:.2f} GiB" if np.isfinite(x) else "-"


class Variant:
  """One value of a --sweep: its config, compiled step and model FLOPs."""

  def __init__(self, config: Any, field: str, raw: str, args: argparse.Namespace):
    self.raw, self.value = raw, parse_value(raw)
    self.config = copy.deepcopy(config)
    assign(self.config, field, self.value, "--sweep")
    self.res = args.res or image_size_of(self.config)
    self.text_len = text_len_of(self.config)
    self.vocab = vocab_size_of(self.config.tokenizer)
    self.dtype = perf.compute_dtype(self.config.model)
    self.phase = recipes.phase_at(self.config, 1)
    self.count = step_flops(self.config, self.res, self.text_len)
    batch = synthetic_batch(self.config.batch_size, self.res, self.text_len, self.vocab,
                            self.config.seed,
                            recipe_batch_shapes(self.config, self.config.batch_size))
    t0 = time.perf_counter()
    self.step = BigVlpStep(self.config, batch, self.vocab)
    self.build_s = time.perf_counter() - t0
    self.times: list[float] = []


def run_sweep(args: argparse.Namespace, config: Any, field: str, raws: list[str]) -> None:
  """--sweep: builds a step per value, times them in alternating rounds, prints a table."""
  base_res = args.res or image_size_of(config)
  print(f"{args.config}: batch {config.batch_size}, {base_res} px, "
        f"{int(config.model.text.max_len)} tokens, vocab {vocab_size_of(config.tokenizer)}, "
        f"{config.loss} loss, {perf.compute_dtype(config.model)}; {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores; sweep {field} = "
        f"{', '.join(raws)}", flush=True)
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  print(f"{allocator.describe()} (big_vlp.allocator)", flush=True)
  peaks: dict[str, tuple[float, str]] = {}  # Per dtype; CPU peaks re-measured every round.
  variants = []
  for raw in raws:
    v = Variant(config, field, raw, args)
    if v.dtype not in peaks:
      peaks[v.dtype] = perf.peak_flops(v.dtype, args.peak_flops)
      print(f"peak {peaks[v.dtype][0] / 1e12:,.3f} TFLOP/s {v.dtype} ({peaks[v.dtype][1]})",
            flush=True)
    print(f"{field}={raw}: batch {v.config.batch_size}, {v.res} px, {v.text_len} tokens, "
          f"phase {tuple(v.phase)}; model FLOPs per step {v.count.train_per_step / 1e9:,.2f} "
          f"G; built in {v.build_s:.1f}s (compile {v.step.compile_s:.1f}s), first step "
          f"{v.step.first_step_s:.2f}s", flush=True)
    variants.append(v)

  for r in range(args.rounds):  # Alternate, so every variant sees the same machine state.
    for v in variants:
      warm_up(v.step, args.warmup)
      v.times.append(v.step.run(args.steps))
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{field}={v.raw} {1e3 * v.times[-1]:.1f} ms/step" for v in variants), flush=True)
    for dtype in peaks:
      peaks[dtype] = remeasure_peak(dtype, args.peak_flops)
  for dtype, (peak, source) in peaks.items():
    print(f"peak {peak / 1e12:,.3f} TFLOP/s {dtype} ({source})", flush=True)

  entries = []
  for v in variants:
    step_s = statistics.median(v.times)
    peak, peak_source = peaks[v.dtype]
    entries.append({
        "value": v.value, "batch": v.config.batch_size, "res": v.res,
        "text_len": v.text_len, "vocab": v.vocab, "dtype": v.dtype, "loss": v.config.loss,
        "phase": {"locked": list(v.phase.locked), "image_mask": v.phase.image_mask,
                  "text_mask": v.phase.text_mask},
        "model_flops_per_step": v.count.train_per_step, "peak_flops": peak,
        "peak_source": peak_source, "xla_flops_per_step": v.step.xla_flops(),
        "step_s": step_s, "img_per_sec": v.config.batch_size / step_s,
        "mfu": v.count.train_per_step / step_s / peak, "final_loss": v.step.loss,
        "round_step_s": v.times, "compile_s": v.step.compile_s,
        "first_step_s": v.step.first_step_s, **v.step.memory()})
  for e in entries:
    e["speedup"] = e["img_per_sec"] / entries[0]["img_per_sec"]
    e["round_speedups"] = round_ratios(entries[0]["round_step_s"], e["round_step_s"])

  width = max(len(field), *(len(raw) for raw in raws))
  print(f"\n{field:{width}s} {'step ms':>9s} {'img/s':>9s} {'MFU':>7s} {'compile+1st s':>14s} "
        f"{'speed-up':>9s} {'step memory':>12s}")
  for raw, e in zip(raws, entries):
    print(f"{raw:{width}s} {1e3 * e['step_s']:9.1f} {e['img_per_sec']:9.1f} "
          f"{100 * e['mfu']:6.1f}% {e['compile_s'] + e['first_step_s']:14.1f} "
          f"{e['speedup']:8.2f}x {_gib(e.get('compiled_bytes', float('nan'))):>12s}")
  print(f"\nmedians of {args.rounds} alternating rounds of {args.steps} steps; speed-up is "
        f"img/s over {field}={raws[0]}'s. MFU counts each variant's own model FLOPs (a masked "
        "model's are fewer), so compare variants by speed-up, not MFU.")
  for raw, e in list(zip(raws, entries))[1:]:
    print(f"speed-up of {field}={raw}: {ratio_spread(e['round_speedups'])}")
  if args.json:
    results = {
        "config": args.config, "overrides": args.set, "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "glibc_tunables": tunables,
        "malloc": allocator.active(), "steps": args.steps, "rounds": args.rounds,
        "sweep": {"field": field, "values": [e["value"] for e in entries]},
        "variants": entries}
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--config", default="demo",
                      help=f"preset ({', '.join(PRESETS)}) or configs/X.py[:args]")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--batch", type=int, help="global batch (default: the config's)")
  parser.add_argument("--res", type=int, help="image size (default: from config.data.pp)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      help="both towers' compute dtype (default: the config's)")
  parser.add_argument("--matmul_dtype", choices=("float32", "bfloat16"),
                      help="the towers' model.*.matmul_dtype: bfloat16 operands, float32 "
                      "sums (open_clip then runs under autocast bfloat16)")
  parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds (medians reported)")
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed steps before each round's timed steps, on each side")
  parser.add_argument("--compare", choices=("open_clip",))
  parser.add_argument("--open_clip_python", help="python of the open_clip environment")
  parser.add_argument("--open_clip_malloc", choices=("same", "glibc"), default="same",
                      help="the open_clip worker's allocator: big_vlp's (default) or plain "
                           "glibc, as an open_clip run gets by default")
  parser.add_argument("--open_clip_compile", action="store_true",
                      help="torch.compile the open_clip model (its --torchcompile)")
  parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
  parser.add_argument("--peak_flops", type=float,
                      help="peak FLOP/s of one device (default: table, or measured on CPU)")
  parser.add_argument("--sweep", metavar="FIELD=V1,V2,...",
                      help="time one variant of the config per value of FIELD, alternating")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()
  if args.warmup < 0:
    parser.error(f"--warmup {args.warmup}: must be 0 or more")
  if args.sweep and args.compare:
    parser.error("--sweep and --compare cannot be combined: --sweep compares big_vlp "
                 "variants with each other; run --compare per variant (--set FIELD=VALUE)")
  sweep = parse_sweep(args.sweep) if args.sweep else None

  config = build_config(args.config)
  for assignment in args.set:
    set_field(config, assignment)
  if args.batch:
    config.batch_size = args.batch
  if args.dtype:
    for part in ("image", "text", "decoder"):
      if config.model.get(part) is not None:
        config.model[part].dtype = args.dtype
  if args.matmul_dtype:
    for part in ("image", "text"):
      if config.model.get(part) is not None:
        config.model[part].matmul_dtype = args.matmul_dtype
  res = args.res or image_size_of(config)
  text_len = text_len_of(config)
  vocab = vocab_size_of(config.tokenizer)
  dtype = perf.compute_dtype(config.model)
  if sweep:
    run_sweep(args, config, *sweep)
    return
  count = step_flops(config, res, text_len)
  peak, peak_source = perf.peak_flops(dtype, args.peak_flops)
  if args.compare and (recipes.caption_on(config) or recipes.silc_on(config)
                       or not recipes.contrastive_on(config)):
    raise SystemExit("--compare open_clip times the plain two-tower step; this config adds "
                     "a captioning decoder or SILC, which the open_clip worker does not build")
  oc_python = (find_open_clip_python(args.open_clip_python, "--compare open_clip")
               if args.compare else None)

  print(f"{args.config}: batch {config.batch_size}, {res} px, {text_len} tokens, vocab "
        f"{vocab}, {config.loss} loss, {dtype}; {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores", flush=True)
  print(f"model FLOPs per step {count.train_per_step / 1e9:,.2f} G; peak "
        f"{peak / 1e12:,.3f} TFLOP/s ({peak_source})", flush=True)
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  print(f"{allocator.describe()} (big_vlp.allocator)", flush=True)
  batch = synthetic_batch(config.batch_size, res, text_len, vocab, config.seed,
                          recipe_batch_shapes(config, config.batch_size))
  t0 = time.perf_counter()
  ours = BigVlpStep(config, batch, vocab)
  print(f"big_vlp: built in {time.perf_counter() - t0:.1f}s (compile {ours.compile_s:.1f}s), "
        f"first step {ours.first_step_s:.2f}s", flush=True)
  theirs = None
  if oc_python:
    spec = open_clip_spec(config, res, vocab, dtype, args.open_clip_compile, args.threads)
    theirs = OpenClipStep(oc_python, spec, args.open_clip_malloc)
    print(f"open_clip {theirs.info.get('open_clip')} (torch {theirs.info.get('torch')}, "
          f"{theirs.info.get('threads')} threads, malloc "
          f"{'glibc' if args.open_clip_malloc == 'glibc' else allocator.active()}): built in "
          f"{theirs.info['build_s']:.1f}s, first step {theirs.info['first_step_s']:.2f}s",
          flush=True)

  times: dict[str, list[float]] = {"big_vlp": [], "open_clip": []}
  usage: list[dict[str, float]] = []
  for r in range(args.rounds):  # Alternate, so both see the same machine state.
    warm_up(ours, args.warmup)
    times["big_vlp"].append(ours.run(args.steps))
    usage.append(ours.usage)
    line = f"round {r + 1}/{args.rounds}: big_vlp {1e3 * times['big_vlp'][-1]:.1f} ms/step"
    if theirs:
      warm_up(theirs, args.warmup)
      times["open_clip"].append(theirs.run(args.steps))
      line += f", open_clip {1e3 * times['open_clip'][-1]:.1f} ms/step"
    print(line, flush=True)
    peak, peak_source = remeasure_peak(dtype, args.peak_flops)
  print(f"peak {peak / 1e12:,.3f} TFLOP/s ({peak_source})", flush=True)

  rows = []
  mem = ours.memory()
  results: dict[str, Any] = {
      "config": args.config, "overrides": args.set, "batch": config.batch_size, "res": res,
      "text_len": text_len, "vocab": vocab, "dtype": dtype, "loss": config.loss,
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "model_flops_per_step": count.train_per_step, "peak_flops": peak,
      "peak_source": peak_source, "xla_flops_per_step": ours.xla_flops(),
      "glibc_tunables": tunables, "malloc": allocator.active()}
  for name, runner in (("big_vlp", ours), ("open_clip", theirs)):
    if runner is None:
      continue
    step_s = statistics.median(times[name])
    entry = {"step_s": step_s, "img_per_sec": config.batch_size / step_s,
             "mfu": count.train_per_step / step_s / peak, "final_loss": runner.loss,
             "round_step_s": times[name]}
    if name == "big_vlp":
      entry.update(compile_s=ours.compile_s, first_step_s=ours.first_step_s, **mem,
                   **{f"{k}_per_step": statistics.median(u[k] for u in usage)
                      for k in usage[0]})
      peak_mem = mem.get("device_peak_bytes", mem.get("compiled_bytes", float("nan")))
    else:
      entry.update(first_step_s=theirs.info["first_step_s"],
                   max_rss_bytes=theirs.max_rss_bytes)
      peak_mem = float("nan")
    results[name] = entry
    rows.append((name, entry, peak_mem))
  if theirs:
    theirs.close()
    results["speedup_vs_open_clip"] = results["open_clip"]["step_s"] / results["big_vlp"]["step_s"]
    results["round_speedups_vs_open_clip"] = round_ratios(times["open_clip"], times["big_vlp"])
    results["open_clip_malloc"] = args.open_clip_malloc

  print(f"\n{'':10s} {'step ms':>9s} {'img/s':>9s} {'MFU':>7s} {'compile+1st s':>14s} "
        f"{'step memory':>12s} {'max RSS':>10s}")
  for name, entry, peak_mem in rows:
    first = entry.get("compile_s", 0.0) + entry["first_step_s"]
    print(f"{name:10s} {1e3 * entry['step_s']:9.1f} {entry['img_per_sec']:9.1f} "
          f"{100 * entry['mfu']:6.1f}% {first:14.1f} {_gib(peak_mem):>12s} "
          f"{_gib(entry['max_rss_bytes']):>10s}")
  ours_entry = results["big_vlp"]
  print(f"\nbig_vlp per step (median over rounds; malloc {allocator.active()}): "
        f"{ours_entry['page_faults_per_step']:,.0f} page faults, "
        f"{ours_entry['system_cpu_s_per_step']:.3f} s system CPU, "
        f"{ours_entry['user_cpu_s_per_step']:.2f} s user CPU")
  if theirs:
    print(f"\nbig_vlp / open_clip throughput: {results['speedup_vs_open_clip']:.2f}x "
          f"(median of {args.rounds} alternating rounds of {args.steps} steps; "
          f"{ratio_spread(results['round_speedups_vs_open_clip'])})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
