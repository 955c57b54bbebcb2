"""The one trainer: `python -m big_vlp.train --config configs/X.py[:k=v] --workdir DIR`.

Reading order: set-up (mesh, tokenizer, model, optimizer, state or resume), then the loop
(input -> jitted step -> logging -> checkpoint -> evaluators), then the final evaluation.
"""

import sys
import time

if __name__ == "__main__":  # Before the heavy imports: the process may restart once.
  from big_vlp import allocator
  allocator.restart_with_allocator()

from typing import Any, NamedTuple

from absl import app, flags
from etils import epath
from ml_collections import config_flags

import jax
import jax.numpy as jnp

from big_vlp import (allocator, checkpoint, config_validation, distributed, flops, perf,
                     preemption, recipes, run_compat, sharding, train_step)
from big_vlp.metric_writer import MetricWriter, Progress, format_duration
from big_vlp.evaluators import build_evaluators
from big_vlp.run_setup import (PhasedSteps, check_batch_keys, check_decoder, cli_workdir,
                               eval_due, gather_stream_states, init_from_checkpoint,
                               load_teacher, make_input, make_run_spec, make_tokenizer,
                               resume_position, run_evaluators, vocab_size_of)

# A logged MFU over 1 against a CPU peak measured at start-up has the peak measured again
# (about a second each time), at most this many times in a run.
MAX_PEAK_REMEASURES = 3


def train(config: Any, workdir: str, stop_at: int | None = None) -> dict[str, float]:
  """Trains (or resumes) the run in `workdir`; returns the final evaluator metrics.

  `stop_at` ends this invocation after that step with a checkpoint, as a preemption
  would; running again on the same workdir continues the run exactly.
  """
  # ---- set-up ------------------------------------------------------------------------
  started = time.perf_counter()
  config_validation.validate_config(config, jax.device_count(), jax.process_count())
  is_main = jax.process_index() == 0
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # Local or gs://...
  ckpt = checkpoint.Checkpointer(workdir, every=config.ckpt_every, keep=config.keep_ckpts)
  # Refuses a config the checkpoints here do not fit (config.json is written once resumed).
  recorded = run_compat.check_workdir_config(config, workdir, is_main=is_main,
                                             has_checkpoint=bool(ckpt.all_steps()))
  mesh = sharding.mesh_from_config(config)

  tokenizer = make_tokenizer(config, workdir)

  def input_after(found: checkpoint.Restored | None) -> tuple[Any, Any]:
    start = resume_position(found.meta, config, found.step) if found else 0
    stream = make_input(config, tokenizer, start)
    return stream, next(stream)

  resumed = ckpt.latest_meta()  # Unreadable newer checkpoints are set aside here...
  batches, first = input_after(resumed)
  batch_shapes = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype)
                  for k, v in first.items()}
  check_batch_keys(config, batch_shapes)
  check_decoder(config, tokenizer)
  spec = make_run_spec(config, mesh, tokenizer.vocab_size, batch_shapes)
  model, abstract, shardings = spec.model, spec.abstract_state, spec.shardings
  if is_main:
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), {jax.process_count()} process(es); {allocator.describe()}")
    print("parameters:\n" + sharding.sharding_table(abstract["params"], shardings["params"]))
  if resumed:
    found = ckpt.restore_latest(abstract)  # ...or here, when only their state is damaged.
    if found is None or found.step != resumed.step:  # Older: its own input position.
      batches.close()
      batches, first = input_after(found)
    resumed = found
  start_step = resumed.step if resumed else 0
  if resumed:
    state = resumed.state
    if is_main:
      print(f"resumed from step {start_step} ({resumed.meta['examples_seen']} examples seen)")
  else:
    state = train_step.init_state(model, spec.tx, shardings, batch_shapes, config.seed)
    state["params"] = init_from_checkpoint(config, state["params"], is_main)  # LiT.
    if "ema" in state:  # SILC: the teacher starts as the (initialised) student.
      state["ema"] = train_step.ema_teacher(state["params"])
  run_compat.record_config(config, workdir, recorded, is_main=is_main)
  steps = PhasedSteps(config, spec, mesh, tuple(batch_shapes),
                      load_teacher(config, mesh, tokenizer, batch_shapes))
  writer = MetricWriter(workdir, is_main=is_main)
  writer.truncate_after(start_step)
  evaluators = build_evaluators(config, model, tokenizer, mesh)
  speed = _speed_model(config, batch_shapes, is_main, start_step + 1)
  meta_base = {"image_shape": list(batch_shapes["image"].shape[1:]),
               "text_len": int(batch_shapes["text"].shape[1]),
               "vocab_size": int(tokenizer.vocab_size), "loss": config.loss,
               "batch_size": int(config.batch_size)}

  # ---- loop --------------------------------------------------------------------------
  run = _Run(config, steps, batches, ckpt, writer, evaluators, meta_base, mesh, speed,
             batch_shapes, started)
  with preemption.StopRequests() as stop_requests:
    return _loop(run, state, first, start_step, stop_at, stop_requests)


class NonFiniteError(RuntimeError):
  """A step's loss or gradients were not finite and config.nan_policy is 'stop'."""


class _Run(NamedTuple):
  """What the loop works with, built by the set-up."""
  config: Any
  steps: PhasedSteps  # The compiled step of each recipe phase.
  batches: Any
  ckpt: checkpoint.Checkpointer
  writer: MetricWriter
  evaluators: dict[str, Any]
  meta_base: dict[str, Any]
  mesh: Any
  speed: "_SpeedModel"
  batch_shapes: dict[str, Any]
  started: float  # perf_counter() when train() was entered.


class _SpeedModel(NamedTuple):
  """What MFU is computed from: model FLOPs of one step and the job's peak FLOP/s."""
  flops_per_step: float
  flops_per_example: float
  peak: float
  peak_source: str

  def rates(self, step_time_s: float, window_s: float, wait_s: float) -> dict[str, float]:
    """MFU, achieved model FLOP/s and the input-wait share of a logging window.

    The wait is the time the loop spent blocked on the input stream; with asynchronous
    dispatch the device may still be computing then, so the share is an upper bound on the
    time the device starved.
    """
    achieved = self.flops_per_step / step_time_s
    return {"mfu": achieved / self.peak, "model_flops_per_sec": achieved,
            "input_wait_fraction": min(wait_s / window_s, 1.0) if window_s > 0 else 0.0}


def _speed_model(config: Any, batch_shapes: dict[str, Any], is_main: bool, step: int,
                 peak: tuple[float, str] | None = None) -> _SpeedModel:
  """Counts the model FLOPs of training step `step` (its recipe phase: masked tokens,
  locked towers; the captioning decoder, SILC's crops) and finds the peak they are measured
  against (or takes `peak`)."""
  crops = lambda key: batch_shapes[key].shape[1:] if key in batch_shapes else None
  count = flops.two_tower_flops(
      config.model, batch_shapes["image"].shape[1:], batch_shapes["text"].shape[1],
      config.batch_size, recipes.phase_at(config, step), config.get("similarity", "pooled"),
      vocab_size=vocab_size_of(config.tokenizer) if recipes.caption_on(config) else None,
      silc=(dict(recipes.setting(config, "silc", "head", {}) or {})
            if recipes.silc_on(config) else None),
      local_shape=crops(recipes.SILC_LOCAL), global_shape=crops(recipes.SILC_GLOBAL))
  peak, source = peak or perf.peak_flops(perf.compute_dtype(config.model),
                                         config.get("peak_flops"))
  if is_main:
    print(f"model FLOPs per step {count.train_per_step / 1e9:,.1f} G "
          f"({count.train_per_example / 1e9:,.3f} G per example, forward + backward); "
          f"peak {peak / 1e12:,.3f} TFLOP/s ({source})", flush=True)
  return _SpeedModel(count.train_per_step, count.train_per_example, peak, source)


def _close(run: _Run) -> None:
  """Releases the input and waits until every checkpoint save is durable."""
  run.batches.close()
  run.ckpt.close()
  run.writer.close()


def _check_finite(run: _Run, state: Any, seen: int) -> int:
  """Reports steps whose update was skipped for non-finite values; under 'stop' closes the
  run (input, pending saves, metrics) and raises NonFiniteError."""
  nf = jax.device_get(state["nonfinite"])
  count = int(nf["count"])
  if count <= seen:
    return count
  run.ckpt.wait()
  last_good = run.ckpt.latest_step()
  report = (f"non-finite loss or gradients at {count - seen} step(s) since the last check, "
            f"last at step {int(nf['last_step'])} (loss {float(nf['last_loss'])}, grad_norm "
            f"{float(nf['last_grad_norm'])}); their updates were skipped, so params and "
            f"optimizer state are still finite. Last good checkpoint: "
            f"{last_good if last_good is not None else 'none'}.")
  if run.config.get("nan_policy", "skip") == "stop":
    _close(run)
    raise NonFiniteError(report + " Stopping (config.nan_policy='stop'); "
                         "config.nan_policy='skip' would go on.")
  if jax.process_index() == 0:
    print("warning: " + report + " Going on (config.nan_policy='skip'); the count is "
          "train/nonfinite_steps.", file=sys.stderr, flush=True)
  return count


class _LogEvent(NamedTuple):
  """A log step's device values, read once the next step has been dispatched."""
  step: int
  metrics: Any
  nonfinite: Any
  host: dict[str, float]  # Input wait, data stats and one-off values taken at the step.


def _loop(run: _Run, state: Any, first: Any, start_step: int, stop_at: int | None,
          stop_requests: preemption.StopRequests) -> dict[str, float]:
  """Steps from start_step + 1 to the end (or a stop), then the final evaluation."""
  config, steps, batches, ckpt, writer, evaluators, meta_base, mesh, *_ = run
  is_main = jax.process_index() == 0
  nonfinite_seen = int(jax.device_get(state["nonfinite"]["count"]))
  total = config.total_steps
  progress = Progress(total, start_step, config.batch_size, is_main)
  wait_s, t_start, pending = 0.0, time.perf_counter(), {}
  deferred: _LogEvent | None = None
  remeasures = 0

  def write(event: _LogEvent) -> int:
    """Reads a log step's metrics from the device, writes them; returns the non-finite
    count (raising under nan_policy='stop')."""
    nonlocal run, remeasures
    values = {f"train/{k}": float(v) for k, v in jax.device_get(event.metrics).items()}
    timing = progress.measure(event.step)  # Now that the step has finished.
    if "step_time_s" in timing:
      window_s, wait = timing.pop("window_s"), event.host["train/input_wait_s"]
      rates = run.speed.rates(timing["step_time_s"], window_s, wait)
      if (rates["mfu"] > 1 and remeasures < MAX_PEAK_REMEASURES
          and perf.is_measured(run.speed.peak_source)):
        # More than the peak: it was measured in a busy moment at start-up. Measure it
        # again (the best of all measurements is kept) and log the new figure.
        t0 = time.perf_counter()
        peak, _ = perf.peak_flops(perf.compute_dtype(config.model), again=True)
        progress.exclude(time.perf_counter() - t0)
        remeasures += 1
        if is_main:
          print(f"step {event.step}: MFU {rates['mfu']:.0%} against the start-up peak; "
                f"CPU peak measured again: {run.speed.peak / 1e12:,.3f} -> "
                f"{peak / 1e12:,.3f} TFLOP/s", flush=True)
        run = run._replace(speed=run.speed._replace(peak=peak))
        values["train/peak_flops"] = peak
        rates = run.speed.rates(timing["step_time_s"], window_s, wait)
      values.update({f"train/{k}": v for k, v in rates.items()})
    values.update({f"train/{k}": v for k, v in timing.items()})
    values.update(event.host)
    writer.write(event.step, values)
    progress.show(event.step, values)
    return _check_finite(run, {"nonfinite": event.nonfinite}, nonfinite_seen)

  local = first
  for step in range(start_step + 1, total + 1):
    if local is None:
      t0 = time.perf_counter()
      local = next(batches)
      wait_s += time.perf_counter() - t0
    step_fn = steps.for_step(step)
    if step > start_step + 1 and steps.phase(step) != steps.phase(step - 1):
      t0 = time.perf_counter()  # A new recipe phase (unlock, unmasked tuning): compile it.
      step_fn.compile(state, train_step.global_batch(local, mesh))
      progress.exclude(time.perf_counter() - t0)
      run = run._replace(speed=_speed_model(  # MFU counts the new phase's FLOPs.
          config, run.batch_shapes, is_main, step, (run.speed.peak, run.speed.peak_source)))
      if is_main:
        print(f"step {step}: recipe phase {steps.phase(step)} (compiled in "
              f"{time.perf_counter() - t0:.1f}s)", flush=True)
    state, metrics = step_fn(state, train_step.global_batch(local, mesh))
    local = None
    if deferred is not None:  # The device is busy with this step while we read the last.
      nonfinite_seen = write(deferred)
      deferred = None
    if step == start_step + 1:  # Compilation: report it, keep it out of img/s.
      jax.block_until_ready(metrics)
      first_step_s = time.perf_counter() - t_start
      startup_s = time.perf_counter() - run.started
      progress.restart(step)
      wait_s = 0.0
      pending = {"train/first_step_s": first_step_s,  # Go into the next log event.
                 "train/startup_s": startup_s,
                 "train/model_flops_per_example": run.speed.flops_per_example,
                 "train/peak_flops": run.speed.peak}
      if is_main:
        print(f"first step done in {first_step_s:.1f}s (includes compilation; "
              f"{startup_s:.1f}s since start)", flush=True)
    preempted = step < total and stop_requests.requested(step)
    stopping = (stop_at is not None and step >= stop_at and step < total) or preempted
    saving = ckpt.should_save(step, total) or stopping
    if step % config.log_every == 0 or step == total:
      host = {"train/input_wait_s": wait_s, "train/examples_seen": step * config.batch_size,
              **{f"data/{k}": v for k, v in batches.stats().items()}, **pending}
      # A copy (dispatched, not waited for): the next step donates the state's buffers.
      event = _LogEvent(step, metrics, jax.tree.map(jnp.copy, state["nonfinite"]), host)
      wait_s, pending = 0.0, {}
      # Read now when a save, an evaluation or the end follows (they wait for the step
      # anyway, and a save must never follow an unchecked non-finite step); otherwise
      # after the next step is dispatched, so the device never idles on the read.
      if saving or step == total or any(eval_due(ev, step) for ev in evaluators.values()):
        nonfinite_seen = write(event)
      else:
        deferred = event
    elif saving:  # Before any save: under 'stop' no checkpoint follows a non-finite step.
      nonfinite_seen = _check_finite(run, state, nonfinite_seen)
    if saving:
      ckpt.save(step, state, {**meta_base, "step": step,
                              "examples_seen": step * config.batch_size,
                              "data_streams": gather_stream_states(batches.states())})
    if stopping:
      _close(run)
      if preempted:
        raise preemption.Preempted(step, stop_requests.signum)
      return {}
    if step < total:
      t0 = time.perf_counter()
      run_evaluators(evaluators, state["params"], step, writer)
      progress.exclude(time.perf_counter() - t0)

  # ---- end ---------------------------------------------------------------------------
  batches.close()
  results = run_evaluators(evaluators, state["params"], total, writer, final=True)
  ckpt.close()
  writer.close()
  if is_main:
    print(f"done in {format_duration(time.perf_counter() - t_start)}. Final results: "
          + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    print(f"metrics: {writer.path}\ncheckpoints: {ckpt.directory}")
  return results


def main(argv: list[str]) -> None:
  del argv
  workdir = cli_workdir()
  distributed.initialize(flags.FLAGS.config)  # Before anything touches the devices.
  try:
    train(flags.FLAGS.config, workdir, stop_at=flags.FLAGS.stop_at)
  except preemption.Preempted as e:
    if jax.process_index() == 0:
      print(str(e), file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_PREEMPTED)


if __name__ == "__main__":
  # Flags live here so that importing this module (tests, evaluate) defines none.
  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
  flags.DEFINE_integer("stop_at", None, "End this invocation after this step with a "
                       "checkpoint; running again with the same workdir continues exactly.")
  app.run(main)
