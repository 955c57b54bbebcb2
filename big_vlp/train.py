"""The one trainer: `python -m big_vlp.train --config configs/X.py[:k=v] --workdir DIR`.

Reading order: set-up (mesh, tokenizer, model, optimizer, state or resume), then the loop
(input -> jitted step -> logging -> checkpoint -> evaluators), then the final evaluation.
"""

import os
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

import jax
import numpy as np

from big_vlp import checkpoint, config_validation, sharding, train_step
from big_vlp.metric_writer import MetricWriter, Progress, format_duration
from big_vlp.model_factory import build_model
from big_vlp.optim import make_optimizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


def make_tokenizer(config: Any, workdir: str) -> Any:
  """The run's tokenizer; 'sp_train:N' trains on the training captions once per workdir."""
  from big_vlp.data import pipeline, tokenizers
  dc = config.data
  texts = lambda: pipeline.iterate_texts(dc.name, dc.split, dc.get("data_dir"),
                                         key=dc.get("text_key", "caption"),
                                         limit=dc.get("tokenizer_examples", 100_000))
  return tokenizers.build_tokenizer(config.tokenizer, workdir=workdir, texts_fn=texts)


def make_input(config: Any, tokenizer: Any, start_example: int):
  """This process's infinite iterator of local batches, starting at `start_example`."""
  from big_vlp.data import pipeline
  dc = config.data
  return pipeline.train_iterator(
      name=dc.name, split=dc.split, data_dir=dc.get("data_dir"), pp=dc.pp,
      tokenizer=tokenizer, local_batch_size=config.batch_size // jax.process_count(),
      seed=config.seed, start_example=start_example, process_index=jax.process_index(),
      process_count=jax.process_count(), shuffle_buffer=dc.get("shuffle_buffer", 50_000))


def run_evaluators(evaluators: dict[str, Any], params: Any, step: int, writer: MetricWriter,
                   final: bool = False) -> dict[str, float]:
  """Runs the due evaluators; one that raises is reported and training goes on."""
  results = {}
  for name, ev in evaluators.items():
    if not final and (ev.cfg.every <= 0 or step % ev.cfg.every):
      continue
    t0 = time.perf_counter()
    try:
      metrics = ev.run(params)
    except Exception as e:  # pylint: disable=broad-except
      print(f"evaluator {name!r} failed at step {step}: {type(e).__name__}: {e}",
            file=sys.stderr, flush=True)
      writer.write(step, {f"{name}/error": 1.0})
      continue
    results.update({f"{name}/{k}": v for k, v in metrics.items()})
    if jax.process_index() == 0:
      shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
      print(f"  eval {name} @ step {step} ({time.perf_counter() - t0:.1f}s): {shown}",
            flush=True)
  if results:
    writer.write(step, results)
  return results


def train(config: Any, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the final evaluator metrics."""
  # ---- set-up ------------------------------------------------------------------------
  config_validation.validate_config(config, jax.device_count(), jax.process_count())
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  ckpt = checkpoint.Checkpointer(workdir, every=config.ckpt_every, keep=config.keep_ckpts)
  start_step = ckpt.latest_step() or 0
  local_batch = config.batch_size // jax.process_count()

  tokenizer = make_tokenizer(config, workdir)
  batches = make_input(config, tokenizer, start_example=start_step * local_batch)
  first = next(batches)
  batch_shapes = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype)
                  for k, v in first.items()}
  model = build_model(config, tokenizer.vocab_size)
  abstract_params = train_step.abstract_params(model, batch_shapes)
  tx, schedule = make_optimizer(config, abstract_params)
  abstract, shardings = train_step.abstract_state(model, tx, config.sharding_rules, mesh,
                                                  batch_shapes)
  if is_main:
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), {jax.process_count()} process(es)")
    print("parameters:\n" + sharding.sharding_table(abstract["params"], shardings["params"]))
  if start_step:
    state, meta = ckpt.restore(start_step, abstract)
    if is_main:
      print(f"resumed from step {start_step} ({meta['examples_seen']} examples seen)")
  else:
    state = train_step.init_state(model, tx, shardings, batch_shapes, config.seed)
  step_fn = train_step.make_train_step(model, tx, config.loss, schedule, shardings, mesh,
                                       tuple(batch_shapes))
  writer = MetricWriter(workdir, is_main=is_main)
  writer.truncate_after(start_step)
  from big_vlp.evaluators import build_evaluators
  evaluators = build_evaluators(config, model, tokenizer, mesh)
  meta_base = {"image_shape": list(batch_shapes["image"].shape[1:]),
               "text_len": int(batch_shapes["text"].shape[1]),
               "vocab_size": int(tokenizer.vocab_size), "loss": config.loss,
               "batch_size": int(config.batch_size)}

  # ---- loop --------------------------------------------------------------------------
  total = config.total_steps
  progress = Progress(total, start_step, config.batch_size, is_main)
  wait_s, t_start = 0.0, time.perf_counter()
  local = first
  for step in range(start_step + 1, total + 1):
    if local is None:
      t0 = time.perf_counter()
      local = next(batches)
      wait_s += time.perf_counter() - t0
    state, metrics = step_fn(state, train_step.global_batch(local, mesh))
    local = None
    if step == start_step + 1 and is_main:
      jax.block_until_ready(metrics)
      print(f"first step done {time.perf_counter() - t_start:.1f}s after start of loop "
            "(includes compilation)", flush=True)
    if step % config.log_every == 0 or step == total:
      values = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
      values.update({f"train/{k}": v for k, v in progress.measure(step).items()})
      values["train/input_wait_s"] = wait_s
      values["train/examples_seen"] = step * config.batch_size
      wait_s = 0.0
      writer.write(step, values)
      progress.show(step, values)
    if ckpt.should_save(step, total):
      ckpt.save(step, state, {**meta_base, "step": step,
                              "examples_seen": step * config.batch_size})
    if step < total:
      run_evaluators(evaluators, state["params"], step, writer)

  # ---- end ---------------------------------------------------------------------------
  results = run_evaluators(evaluators, state["params"], total, writer, final=True)
  ckpt.close()
  writer.close()
  if is_main:
    print(f"done in {format_duration(time.perf_counter() - t_start)}; metrics in "
          f"{writer.path}; checkpoints in {ckpt.directory}")
  return results


def main(argv: list[str]) -> None:
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
