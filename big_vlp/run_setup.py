"""Set-up shared by `train` and `evaluate`: tokenizer, input, model + optimizer + state spec,
and running the configured evaluators."""

import re
import sys
import time
from typing import Any, NamedTuple

from absl import app, flags, logging
import jax
import numpy as np
from jax.sharding import Mesh

from big_vlp import recipes, train_step
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
  build = lambda: tokenizers.build_tokenizer(config.tokenizer, workdir=workdir,
                                             texts_fn=texts)
  if jax.process_count() == 1:
    return build()
  # Several processes: process 0 trains (if the spec trains), the others then load its file
  # from the shared workdir, so every process tokenizes with the same vocabulary.
  from jax.experimental import multihost_utils
  tok = build() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("big_vlp tokenizer")
  return tok if tok is not None else build()


def input_shards(config: Any) -> int:
  """Number of input stream shards: `data.shards`, or one per process when unset (its fit
  with the process count and batch size is checked by config_validation)."""
  return config.data.get("shards") or jax.process_count()


def _my_shards(config: Any) -> range:
  per = input_shards(config) // jax.process_count()
  return range(jax.process_index() * per, (jax.process_index() + 1) * per)


def make_input(config: Any, tokenizer: Any, starts: Any):
  """This process's infinite iterator of local batches (a ShardedInput over its shards).

  `starts`: one StreamState per shard of this process, or one example count for all.
  """
  from big_vlp.data import stream
  dc = config.data
  shards = input_shards(config)
  mine = _my_shards(config)
  if not isinstance(starts, (list, tuple)):
    starts = [starts] * len(mine)
  iterators = [stream.train_iterator(
      data_sources(dc), pp=dc.pp, tokenizer=tokenizer,
      local_batch_size=config.batch_size // shards, seed=config.seed,
      start=start, process_index=shard, process_count=shards,
      shuffle_buffer=dc.get("shuffle_buffer", 50_000), block_size=dc.get("block_size", 1024),
      max_skip_fraction=dc.get("max_skip_fraction", 0.5)) for shard, start in zip(mine, starts)]
  return stream.ShardedInput(iterators, mine.start)


def gather_stream_states(states: list[Any]) -> list[dict[str, Any]]:
  """Every shard's input stream state, in shard order (a collective: all processes call
  it together)."""
  if jax.process_count() == 1:
    return [s.to_json() for s in states]
  from jax.experimental import multihost_utils
  a = np.stack([s.to_array() for s in states])  # [shards per process, K]
  halves = np.stack([(a >> 32).astype(np.int32), (a & 0xFFFFFFFF).astype(np.uint32).view(
      np.int32)])
  gathered = np.asarray(multihost_utils.process_allgather(halves))  # [P, 2, S/P, K]
  full = (gathered[:, 0].astype(np.int64) << 32) | gathered[:, 1].view(np.uint32).astype(
      np.int64)
  rows = full.reshape(-1, full.shape[-1])
  return [type(states[0]).from_array(row, states[0].sources).to_json() for row in rows]


def resume_position(meta: dict[str, Any], config: Any, step: int) -> Any:
  """This process's per-shard stream states from checkpoint meta; approximated (with a
  warning) when the checkpoint holds none that fits (older checkpoint, other shard count
  or sources)."""
  from big_vlp.data.stream import StreamState
  states = meta.get("data_streams")
  sources = data_sources(config.data)
  labels = [s.id for s in sources]
  shards = input_shards(config)
  if states and len(states) == shards:
    mine = [StreamState.from_json(states[i]) for i in _my_shards(config)]
    if all(st.sources == labels for st in mine):
      return mine
  per_shard = step * (config.batch_size // shards)
  if jax.process_index() == 0:
    print(f"warning: the checkpoint of step {step} has no input position for this layout "
          f"({shards} input shard(s), sources {labels}); the input resumes at example "
          f"{per_shard} of each shard's stream (exact only if no example was dropped).",
          file=sys.stderr, flush=True)
  return per_shard


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
                                                  batch_shapes, config.get("logical_axes"))
  return RunSpec(model, tx, schedule, abstract, shardings)


class Teacher(NamedTuple):
  """A frozen distillation teacher: its model and (replicated) params."""
  model: Any
  params: Any


def load_teacher(config: Any, mesh: Mesh, tokenizer: Any,
                 batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> Teacher | None:
  """The teacher run of config.distill (source 'teacher'), checked against this run's input."""
  if recipes.setting(config, "distill", "source", "none") != "teacher":
    return None
  from big_vlp import pretrained  # pylint: disable=import-outside-toplevel
  run = pretrained.load_run(config.distill.teacher, config.distill.get("step"), mesh=mesh,
                            field="distill.teacher")
  pretrained.check_tokenizer(run, tokenizer, field="distill.teacher")
  image = tuple(batch_shapes["image"].shape[1:])
  if tuple(run.meta["image_shape"]) != image:
    raise ConfigError(
        f"config.distill.teacher={config.distill.teacher!r}: the teacher was trained on "
        f"images {tuple(run.meta['image_shape'])}, this run's input gives {image}; make "
        "config.data.pp resize to the teacher's size")
  return Teacher(run.model, run.params)


def init_from_checkpoint(config: Any, params: Any, is_main: bool) -> Any:
  """`params` with config.init.subtrees taken from config.init.workdir's checkpoint."""
  if not recipes.setting(config, "init", "workdir", None):
    return params
  from big_vlp import pretrained  # pylint: disable=import-outside-toplevel
  run = pretrained.load_run(config.init.workdir, config.init.get("step"), field="init.workdir")
  subtrees = tuple(config.init.get("subtrees") or ()) or tuple(params)
  merged = pretrained.merge_subtrees(params, run.params, subtrees, field="init.subtrees")
  if is_main:
    print(f"initialised {', '.join(subtrees)} from {run.workdir} (step {run.step})",
          flush=True)
  return merged


def decoder_pad_id(config: Any) -> int:
  """The captioning decoder's padding (= BOS) id, config.model.decoder.pad_id (default 0)."""
  dec = config.model.get("decoder")
  return 0 if dec is None else int(dec.get("pad_id", 0))


def check_decoder(config: Any, tokenizer: Any) -> None:
  """Refuses a decoder whose padding id is not the tokenizer's (it would learn padding)."""
  if recipes.caption_on(config) and decoder_pad_id(config) != tokenizer.pad_id:
    raise ConfigError(
        f"config.model.decoder.pad_id={decoder_pad_id(config)} but the tokenizer "
        f"{config.get('tokenizer')!r} pads with {tokenizer.pad_id}; set "
        f"config.model.decoder.pad_id={tokenizer.pad_id}")


def check_batch_keys(config: Any, keys: Any) -> None:
  """Refuses an input whose batches lack what the recipe reads (stored teacher embeddings,
  SILC's local crops)."""
  if recipes.silc_on(config) and recipes.SILC_LOCAL not in keys:
    raise ConfigError(
        f"config.silc.weight={config.silc.weight} trains on local crops, but config.data.pp "
        f"gives {', '.join(sorted(keys))} (no {recipes.SILC_LOCAL!r}); crop with "
        "multi_crop(...) and keep 'image_local' (and 'image_global') in the pp")
  if recipes.setting(config, "distill", "source", "none") == "data":
    missing = [k for k in recipes.TEACHER_KEYS if k not in keys]
    if missing:
      raise ConfigError(
          f"config.distill.source='data' reads {', '.join(recipes.TEACHER_KEYS)} from the "
          f"batches, but config.data.pp gives {', '.join(sorted(keys))} (missing "
          f"{', '.join(missing)}); write them with tools/teacher_embeddings.py and keep them "
          "in the pp")


class PhasedSteps:
  """The compiled train step of each recipe phase (big_vlp.recipes.Phase), built on first
  use; `for_step(n)` gives the one training step n runs with."""

  def __init__(self, config: Any, spec: RunSpec, mesh: Mesh, batch_keys: tuple[str, ...],
               teacher: Teacher | None = None):
    self.config, self.spec, self.mesh, self.keys = config, spec, mesh, batch_keys
    self.teacher = teacher
    self.labels = recipes.param_labels(config, spec.abstract_state["params"])
    self._steps: dict[recipes.Phase, Any] = {}

  def phase(self, step: int) -> recipes.Phase:
    """The recipe phase of training step `step`."""
    return recipes.phase_at(self.config, step)

  def for_step(self, step: int) -> Any:
    """fn(state, batch) -> (state, metrics) for training step `step`."""
    phase = self.phase(step)
    if phase not in self._steps:
      self._steps[phase] = self._build(phase)
    return self._steps[phase]

  def _build(self, phase: recipes.Phase) -> Any:
    config, spec = self.config, self.spec
    trainable = recipes.trainable(self.labels, phase)
    all_train = all(jax.tree.leaves(trainable))
    tx = spec.tx
    if not phase.locked and "staged" in jax.tree.leaves(self.labels):
      tx, _ = make_optimizer(config, spec.abstract_state["params"], unlocked=True)
    distill = recipes.setting(config, "distill", "source", "none")
    caption = recipes.caption_on(config)
    options = train_step.StepOptions(
        phase=phase, trainable=None if all_train else trainable,
        similarity=config.get("similarity", "pooled"), distill_source=distill,
        distill_weight=float(config.distill.weight) if distill != "none" else 0.0,
        teacher=self.teacher.model if self.teacher else None,
        contrastive=recipes.contrastive_on(config),
        caption_weight=float(config.caption.weight) if caption else 0.0,
        parallel_prob=float(config.caption.parallel_prob) if caption else 0.0,
        pad_id=decoder_pad_id(config), silc=train_step.silc_options(config))
    return train_step.make_train_step(
        spec.model, tx, config.loss, spec.schedule, spec.shardings, self.mesh, self.keys,
        loss_impl=config.get("loss_impl", "global"), accum_steps=config.get("accum_steps", 1),
        options=options, teacher_params=self.teacher.params if self.teacher else None)


# Pre-processing ops that set the image size; the last one in the train pp wins.
_SIZE_OPS = r"(?:resize|central_crop|random_crop|inception_crop|resize_small)\((\d+)"


def text_len_of(config: Any) -> int:
  """Token length of the captions: the text tower's max_len (the decoder's for CapPa)."""
  tower = config.model.get("text") or config.model.get("decoder")
  return int(tower["max_len"])


def recipe_batch_shapes(config: Any, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Batch features beyond 'image' and 'text' that the recipe reads, as the config's pp makes
  them (SILC's crops from its multi_crop op), for tools that build batches without running
  the input pipeline (tools/benchmark.py, tools/plan.py)."""
  if not recipes.silc_on(config):
    return {}
  import inspect  # pylint: disable=import-outside-toplevel
  from big_vlp.data import ops  # pylint: disable=import-outside-toplevel
  for name, args, kwargs in ops.parse_spec(config.data.pp, "data.pp"):
    if name != "multi_crop":
      continue
    bound = inspect.signature(ops.multi_crop).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments

    def crops(count: int, size: Any) -> jax.ShapeDtypeStruct:
      hw = (size, size) if isinstance(size, int) else tuple(size)
      return jax.ShapeDtypeStruct((batch_size, count, *hw, 3), np.float32)
    return {recipes.SILC_GLOBAL: crops(a["global_crops"], a["global_size"]),
            recipes.SILC_LOCAL: crops(a["local_crops"], a["local_size"])}
  raise ConfigError(f"config.silc.weight={config.silc.weight} trains on local crops, but "
                    "config.data.pp has no multi_crop(...) op to make them")


def vocab_size_of(spec: str) -> int:
  """The vocabulary size a tokenizer spec gives, without training or reading data."""
  kind, _, arg = spec.partition(":")
  if spec == "bytes":
    from big_vlp.data.tokenizers import ByteTokenizer  # pylint: disable=import-outside-toplevel
    return ByteTokenizer().vocab_size
  if kind == "sp_train":
    return int(arg.split(":")[0])
  if kind == "sp":
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    return spm.SentencePieceProcessor(model_file=arg).get_piece_size()
  raise ConfigError(f"config.tokenizer={spec!r}: cannot tell its vocabulary size")


def image_size_of(config: Any) -> int:
  """Square image size the train pp produces (its last resize / crop op)."""
  sizes = re.findall(_SIZE_OPS, config.data.pp)
  if not sizes:
    raise ConfigError("config.data.pp has no resize/crop op to take the image size from; "
                      "give the image size on the command line (plan.py --image_size, "
                      "benchmark.py --res)")
  return int(sizes[-1])


def eval_due(ev: Any, step: int) -> bool:
  """Whether evaluator `ev` runs after training step `step` (its `every`; 0 = only at the end)."""
  return ev.cfg.every > 0 and step % ev.cfg.every == 0


def run_evaluators(evaluators: dict[str, Any], params: Any, step: int, writer: MetricWriter,
                   final: bool = False) -> dict[str, float]:
  """Runs the due evaluators; one that raises is reported and training goes on."""
  results = {}
  for name, ev in evaluators.items():
    if not final and not eval_due(ev, step):
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
