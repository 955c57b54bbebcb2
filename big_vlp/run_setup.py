"""Set-up shared by `train` and `evaluate`: tokenizer, input, model + optimizer + state spec,
and running the configured evaluators."""

import sys
import time
from typing import Any, NamedTuple

from absl import app, flags, logging
import jax
import numpy as np
from jax.sharding import Mesh

from big_vlp import train_step
from big_vlp.config_errors import ConfigError
from big_vlp.metric_writer import MetricWriter
from big_vlp.model_factory import build_model
from big_vlp.optim import make_optimizer


def data_sources(dc: Any) -> list[Any]:
  """The training sources of `config.data`: one dataset, or the entries of `data.mixture`."""
  from big_vlp.data.stream import Source
  mixture = dc.get("mixture")
  if not mixture:
    return [Source(name=dc.name, split=dc.get("split", "train"), data_dir=dc.get("data_dir"))]
  sources = []
  for label, m in mixture.items():
    if "name" not in m:
      raise ConfigError(f"config.data.mixture.{label}: missing field 'name' (each mixture "
                        "entry has name and optionally split, data_dir, weight, pp)")
    sources.append(Source(
        name=m["name"], split=m.get("split") or dc.get("split", "train"),
        data_dir=m.get("data_dir") or dc.get("data_dir"), weight=float(m.get("weight", 1.0)),
        pp=m.get("pp"), field=f"data.mixture.{label}", label=label))
  return sources


def make_tokenizer(config: Any, workdir: str) -> Any:
  """The run's tokenizer; 'sp_train:N' trains on the training captions once per workdir."""
  from big_vlp.data import pipeline, tokenizers
  dc = config.data
  sources = data_sources(dc)
  limit = dc.get("tokenizer_examples", 100_000)
  total_weight = sum(s.weight for s in sources)

  def texts():  # Captions of every source, in proportion to the mixture weights.
    for s in sources:
      yield from pipeline.iterate_texts(s.name, s.split, s.data_dir,
                                        key=dc.get("text_key", "caption"),
                                        limit=max(1, round(limit * s.weight / total_weight)))
  return tokenizers.build_tokenizer(config.tokenizer, workdir=workdir, texts_fn=texts)


def make_input(config: Any, tokenizer: Any, start: Any):
  """This process's infinite iterator of local batches, from `start` (a StreamState or an
  example count)."""
  from big_vlp.data import stream
  dc = config.data
  return stream.train_iterator(
      data_sources(dc), pp=dc.pp, tokenizer=tokenizer,
      local_batch_size=config.batch_size // jax.process_count(), seed=config.seed,
      start=start, process_index=jax.process_index(), process_count=jax.process_count(),
      shuffle_buffer=dc.get("shuffle_buffer", 50_000), block_size=dc.get("block_size", 1024),
      max_skip_fraction=dc.get("max_skip_fraction", 0.5))


def gather_stream_states(state: Any) -> list[dict[str, Any]]:
  """Every process's input stream state (a collective: all processes call it together)."""
  if jax.process_count() == 1:
    return [state.to_json()]
  from jax.experimental import multihost_utils
  a = state.to_array()
  halves = np.stack([(a >> 32).astype(np.int32), (a & 0xFFFFFFFF).astype(np.uint32).view(
      np.int32)])
  gathered = np.asarray(multihost_utils.process_allgather(halves))  # [P, 2, K]
  full = (gathered[:, 0].astype(np.int64) << 32) | gathered[:, 1].view(np.uint32).astype(
      np.int64)
  return [type(state).from_array(row, state.sources).to_json() for row in full]


def resume_position(meta: dict[str, Any], sources: list[Any], step: int,
                    local_batch: int) -> Any:
  """This process's stream state from checkpoint meta; approximated (with a warning) when
  the checkpoint holds none that fits (older checkpoint, other process count or sources)."""
  from big_vlp.data.stream import StreamState
  states = meta.get("data_streams")
  labels = [s.id for s in sources]
  if states and len(states) == jax.process_count():
    state = StreamState.from_json(states[jax.process_index()])
    if state.sources == labels:
      return state
  if jax.process_index() == 0:
    print(f"warning: the checkpoint of step {step} has no input position for this layout "
          f"({jax.process_count()} process(es), sources {labels}); the input resumes at "
          f"example {step * local_batch} of each process's stream (exact only if no "
          "example was dropped).", file=sys.stderr, flush=True)
  return step * local_batch


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
