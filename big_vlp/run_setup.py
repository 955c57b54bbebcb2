"""Set-up shared by `train` and `evaluate`: tokenizer, input, model + optimizer + state spec,
and running the configured evaluators."""

import sys
import time
from typing import Any, NamedTuple

from absl import app, flags, logging
import jax
from jax.sharding import Mesh

from big_vlp import train_step
from big_vlp.metric_writer import MetricWriter
from big_vlp.model_factory import build_model
from big_vlp.optim import make_optimizer


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


class RunSpec(NamedTuple):
  """Everything derived from the config that a train state depends on."""
  model: Any
  tx: Any
  schedule: Any
  abstract_state: Any
  shardings: Any


def make_run_spec(config: Any, mesh: Mesh, vocab_size: int,
                  batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> RunSpec:
  """Model, optimizer, schedule and the sharded abstract state, allocating nothing."""
  model = build_model(config, vocab_size)
  tx, schedule = make_optimizer(config, train_step.abstract_params(model, batch_shapes))
  abstract, shardings = train_step.abstract_state(model, tx, config.sharding_rules, mesh,
                                                  batch_shapes)
  return RunSpec(model, tx, schedule, abstract, shardings)


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


def cli_workdir() -> str:
  """Shared start of the CLIs: quiet absl logging unless --verbosity given; --workdir set."""
  if not flags.FLAGS["verbosity"].present:  # Hide orbax/tfds INFO chatter unless asked.
    logging.set_verbosity(logging.WARNING)
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  return flags.FLAGS.workdir
