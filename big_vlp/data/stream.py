"""The training stream: seekable shuffling, mixtures, dropped bad examples, exact resume.

Reading one source on one process: the process's part of the split (tfds file instructions)
is cut into blocks of at most `block_size` consecutive records. Every epoch permutes the
blocks with a stateless seed and groups them into windows of `window_blocks` blocks; the
blocks of a window are read interleaved and the window is shuffled completely. An example's
place in the stream is therefore a pure function of its position n = (epoch, window, offset)
and of the seed, and resuming at n rebuilds only one window (at most `shuffle_buffer`
records are read again), however large the dataset.

Pre-processing runs per example with a stateless seed derived from (seed, process, source,
n). An example whose pre-processing raises (an undecodable image, a crop larger than the
image, ...) is dropped; each example carries its position, so the gaps count the drops.

Several sources are mixed by a stateless categorical draw per mixed index m. The state of
the stream is (m, next position of every source, drops per source): `TrainIterator.state()`
returns it after the batches consumed so far, and a stream started from that state yields
exactly what the uninterrupted stream would have yielded next.
"""

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np
from big_vlp.data import tf_cpu  # noqa: F401  (hides GPUs from TF first)
import tensorflow as tf

from big_vlp.config_errors import fail
from big_vlp.data import ops, pipeline

POSITION_KEY = "_position"
SOURCE_KEY = "_source"
_CHECK_EXAMPLES = 16  # Examples pre-processed eagerly at start-up to catch a broken pp.
_INT64_MAX = np.iinfo(np.int64).max


class DataError(RuntimeError):
  """The input stream cannot go on (e.g. most examples of a source are broken)."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One dataset of the training input; `pp` None means the stream's pp."""
  name: str
  split: str = "train"
  data_dir: str | None = None
  weight: float = 1.0
  pp: str | None = None
  field: str = "data"  # Config prefix that errors name, e.g. 'data.mixture.laion'.
  label: str = ""  # Names the source in metrics and stream states; default 'name:split'.

  @property
  def id(self) -> str:
    return self.label or f"{self.name}:{self.split}"


@dataclasses.dataclass
class StreamState:
  """Where a process's stream is: mixed examples consumed, per-source positions and drops."""
  examples: int
  positions: list[int]
  skipped: list[int]
  sources: list[str]

  @classmethod
  def start(cls, sources: Sequence[Source], examples: int = 0) -> "StreamState":
    """State after `examples` consumed examples, assuming none was dropped (a legacy resume)."""
    weights = np.array([s.weight for s in sources], np.float64)
    positions = np.floor(examples * weights / weights.sum()).astype(np.int64)
    positions[0] += examples - positions.sum()  # Exact for one source.
    return cls(examples, [int(p) for p in positions], [0] * len(sources),
               [s.id for s in sources])

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "StreamState":
    return cls(int(d["examples"]), [int(p) for p in d["positions"]],
               [int(s) for s in d["skipped"]], list(d["sources"]))

  def to_array(self) -> np.ndarray:
    """Fixed-length int64 vector (for gathering across processes)."""
    return np.array([self.examples, *self.positions, *self.skipped], np.int64)

  @classmethod
  def from_array(cls, a: np.ndarray, sources: list[str]) -> "StreamState":
    k = len(sources)
    a = [int(x) for x in np.asarray(a).reshape(-1)]
    return cls(a[0], a[1:1 + k], a[1 + k:1 + 2 * k], list(sources))


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _Blocks:
  """Block table of one source on one process."""
  files: np.ndarray  # [num_blocks] str
  skips: np.ndarray  # [num_blocks] int64: first record of the block in its file
  takes: np.ndarray  # [num_blocks] int64: records in the block

  @property
  def epoch_size(self) -> int:
    return int(self.takes.sum())


def make_blocks(file_instructions: Sequence[Any], block_size: int) -> _Blocks:
  """Cuts tfds file instructions into blocks of at most `block_size` records."""
  files, skips, takes = [], [], []
  for fi in file_instructions:
    take = fi.take if fi.take >= 0 else fi.examples_in_shard - fi.skip
    for start in range(0, take, block_size):
      files.append(fi.filename)
      skips.append(fi.skip + start)
      takes.append(min(block_size, take - start))
  return _Blocks(np.array(files, dtype=object), np.array(skips, np.int64),
                 np.array(takes, np.int64))


def _block_reader(file_format: str) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor],
                                                tf.data.Dataset]:
  """(file, skip, take) -> dataset of that block's serialized records."""
  if file_format == "tfrecord":
    return lambda f, skip, take: tf.data.TFRecordDataset(f).skip(skip).take(take)
  if file_format == "array_record":
    from array_record.python.array_record_module import ArrayRecordReader

    def fetch(f, skip, take):
      f, skip, take = (np.asarray(x).item() for x in (f, skip, take))
      reader = ArrayRecordReader(f.decode() if isinstance(f, bytes) else f)
      try:
        return np.array(reader.read(list(range(skip, skip + take))), dtype=object)
      finally:
        reader.close()

    def read(f, skip, take):
      records = tf.numpy_function(fetch, [f, skip, take], tf.string, stateful=False)
      return tf.data.Dataset.from_tensor_slices(tf.reshape(records, [-1]))
    return read
  raise ValueError(f"file format {file_format!r} is not supported for training; "
                   "supported: tfrecord, array_record")


class _SourceStream:
  """The records of one source on one process, from a position on, as described above."""

  def __init__(self, blocks: _Blocks, file_format: str, key: int, window_blocks: int,
               block_size: int):
    self.blocks = blocks
    self.key = key
    self.window_blocks = window_blocks
    self.window_records = window_blocks * block_size
    self.num_windows = -(-len(blocks.takes) // window_blocks)
    self._read_block = _block_reader(file_format)
    self._files = tf.constant(blocks.files.astype(str))
    self._skips = tf.constant(blocks.skips)
    self._takes = tf.constant(blocks.takes)

  def _epoch_seed(self, epoch) -> tf.Tensor:
    return tf.stack([tf.constant(self.key, tf.int64), tf.cast(epoch, tf.int64)])

  def _permutation(self, epoch) -> tf.Tensor:
    return tf.random.experimental.stateless_shuffle(
        tf.range(len(self.blocks.takes), dtype=tf.int64), seed=self._epoch_seed(epoch))

  def _window(self, epoch, window, skip) -> tf.data.Dataset:
    idx = self._permutation(epoch)[window * self.window_blocks:
                                   (window + 1) * self.window_blocks]
    rows = tf.data.Dataset.from_tensor_slices(
        (tf.gather(self._files, idx), tf.gather(self._skips, idx), tf.gather(self._takes, idx)))
    records = rows.interleave(self._read_block, cycle_length=self.window_blocks,
                              block_length=1)
    seed = tf.random.experimental.stateless_fold_in(self._epoch_seed(epoch), window)
    shuffle_seed = tf.random.stateless_uniform([], seed=seed, minval=None, maxval=None,
                                               dtype=tf.int64)
    return records.shuffle(self.window_records, seed=shuffle_seed,
                           reshuffle_each_iteration=False).skip(skip)

  def _epoch(self, epoch, first_window: int = 0, skip: int = 0) -> tf.data.Dataset:
    epoch = tf.cast(epoch, tf.int64)
    windows = tf.data.Dataset.range(first_window, self.num_windows)
    return windows.flat_map(lambda w: self._window(
        epoch, w, tf.where(w == first_window, tf.constant(skip, tf.int64), 0)))

  def locate(self, position: int) -> tuple[int, int, int]:
    """(epoch, window, offset in window) of a stream position."""
    epoch, offset = divmod(position, self.blocks.epoch_size)
    perm = self._permutation(epoch).numpy()
    sizes = self.blocks.takes[perm]
    window_sizes = np.add.reduceat(sizes, np.arange(0, len(sizes), self.window_blocks))
    starts = np.concatenate([[0], np.cumsum(window_sizes)])
    window = int(np.searchsorted(starts, offset, side="right") - 1)
    return epoch, window, int(offset - starts[window])

  def records(self, position: int) -> tf.data.Dataset:
    """(position, serialized record) pairs from `position` on, forever."""
    epoch, window, skip = self.locate(position)
    first = self._epoch(epoch, window, skip)
    rest = tf.data.Dataset.range(epoch + 1, _INT64_MAX).flat_map(self._epoch)
    return tf.data.Dataset.zip(tf.data.Dataset.range(position, _INT64_MAX),
                               first.concatenate(rest))

  def head(self, n: int) -> list[bytes]:
    """The first n records of the first block (for start-up checks)."""
    b = self.blocks
    take = min(n, int(b.takes[0]))
    ds = self._read_block(tf.constant(b.files[0]), tf.constant(b.skips[0], tf.int64),
                          tf.constant(take, tf.int64))
    return list(ds.as_numpy_iterator())


# ----------------------------------------------------------------------------- the stream


def _check_pp(stream: _SourceStream, prepare: Callable, source: Source, field: str,
              pp: str) -> None:
  """Raises ConfigError if pre-processing fails on every one of the first examples."""
  errors = []
  records = stream.head(_CHECK_EXAMPLES)
  for i, record in enumerate(records):
    try:
      _, example = prepare(tf.constant(i, tf.int64), tf.constant(record))
      tf.nest.map_structure(lambda x: x.numpy(), example)
      return
    except (tf.errors.OpError, ValueError, TypeError, KeyError) as e:
      errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
  if records:
    fail(field, pp, f"fails on every one of the first {len(records)} examples of "
         f"{source.id!r}, so every example would be dropped; first error: {errors[0]}")


def _source_dataset(j: int, source: Source, *, pp: str, tokenizer: Any, seed: int,
                    position: int, process_index: int, process_count: int,
                    shuffle_buffer: int, block_size: int) -> tf.data.Dataset:
  """Pre-processed examples of one source with `_source` and `_position`, bad ones dropped."""
  builder = pipeline.get_builder(source.name, source.data_dir, field=f"{source.field}.name")
  pipeline.check_split(builder, source.split, f"{source.field}.split")
  pp_field = f"{source.field}.pp" if source.pp else "data.pp"
  pp = source.pp or pp
  preprocess = ops.get_preprocess_fn(pp, tokenizer, field=pp_field)
  local_split = pipeline.process_split(source.split, process_index, process_count)
  blocks = make_blocks(builder.info.splits[local_split].file_instructions, block_size)
  if blocks.epoch_size == 0:
    fail(f"{source.field}.split", source.split,
         f"process {process_index} of {process_count} gets no examples of {source.id!r}")
  window_blocks = max(1, min(len(blocks.takes), shuffle_buffer // block_size))
  stream = _SourceStream(blocks, str(builder.info.file_format.value), pipeline.stream_key(
      seed, process_index, j), window_blocks, block_size)
  features = builder.info.features
  decoders = pipeline.image_decoders(features)

  def prepare(position, record):
    example = dict(features.deserialize_example(record, decoders=decoders))
    example[ops.SEED_KEY] = tf.stack([tf.constant(stream.key, tf.int64), position])
    example = preprocess(example)
    return position, {k: v for k, v in example.items() if k != ops.SEED_KEY}

  _check_pp(stream, prepare, source, pp_field, pp)

  def tag(position, example):
    return {**example, POSITION_KEY: position, SOURCE_KEY: tf.constant(j, tf.int32)}

  ds = stream.records(position)
  # Encoded records read ahead, so that refilling a window's shuffle buffer never
  # starves the (much slower) decoding below.
  ds = ds.prefetch(max(1024, min(shuffle_buffer // 4, 16_384)))
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.ignore_errors().map(tag)


def train_iterator(sources: Sequence[Source], *, pp: str, tokenizer: Any,
                   local_batch_size: int, seed: int, start: "StreamState | int" = 0,
                   process_index: int = 0, process_count: int = 1,
                   shuffle_buffer: int = 50_000, block_size: int = 1024, prefetch: int = 2,
                   max_skip_fraction: float = 0.5) -> "TrainIterator":
  """Infinite stream of this process's numpy batches, resumed from `start`.

  `start` is a StreamState from `TrainIterator.state()` (exact), or a number of examples
  already consumed (exact when none was dropped).
  """
  if not sources:
    raise ValueError("need at least one source")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  weights = [s.weight for s in sources]
  if any(not (w > 0 and math.isfinite(w)) for w in weights):
    bad = next(s for s in sources if not (s.weight > 0 and math.isfinite(s.weight)))
    fail(f"{bad.field}.weight", bad.weight, "must be a positive finite number")
  if isinstance(start, int):
    if start < 0:
      raise ValueError(f"start must be >= 0, got {start}")
    start = StreamState.start(sources, start)
  if start.sources != [s.id for s in sources]:
    raise ValueError(f"stream state is for sources {start.sources}, not "
                     f"{[s.id for s in sources]}")
  datasets = [
      _source_dataset(j, s, pp=pp, tokenizer=tokenizer, seed=seed, position=start.positions[j],
                      process_index=process_index, process_count=process_count,
                      shuffle_buffer=shuffle_buffer, block_size=block_size)
      for j, s in enumerate(sources)]
  if len(datasets) == 1:
    ds = datasets[0]
  else:
    logits = tf.math.log(tf.constant([weights], tf.float64) / sum(weights))
    mix_key = pipeline.stream_key(seed, process_index, len(sources), 0x6d6978)

    def draw(m):
      return tf.random.stateless_categorical(
          logits, 1, seed=tf.stack([tf.constant(mix_key, tf.int64), m]))[0, 0]

    selector = tf.data.Dataset.range(start.examples, _INT64_MAX).map(draw)
    ds = tf.data.Dataset.choose_from_datasets(datasets, selector)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(prefetch)
  # Parallel maps keep the order: exact resume needs it.
  return TrainIterator(ds.with_options(pipeline.deterministic_options()), start, sources,
                       max_skip_fraction)


class TrainIterator:
  """Numpy batches of the stream; keeps the stream state of what it has handed out."""

  def __init__(self, ds: tf.data.Dataset, state: StreamState, sources: Sequence[Source],
               max_skip_fraction: float, min_examples_for_check: int = 1000):
    self._it = ds.as_numpy_iterator()
    self._state = dataclasses.replace(state, positions=list(state.positions),
                                      skipped=list(state.skipped))
    self._start = list(state.positions)
    self._start_skipped = list(state.skipped)
    self._sources = list(sources)
    self._max_skip = max_skip_fraction
    self._min_check = min_examples_for_check
    pipeline.register_live_iterator(self)

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      raise StopIteration
    batch = next(self._it)
    sources = batch.pop(SOURCE_KEY)
    positions = batch.pop(POSITION_KEY)
    st = self._state
    for j in range(len(st.positions)):
      mine = positions[sources == j]
      if len(mine):
        end = int(mine.max()) + 1
        st.skipped[j] += end - st.positions[j] - len(mine)
        st.positions[j] = end
    st.examples += len(sources)
    self._check_skips()
    return batch

  def _check_skips(self) -> None:
    for j, source in enumerate(self._sources):
      read = self._state.positions[j] - self._start[j]
      dropped = self._state.skipped[j] - self._start_skipped[j]
      if read >= self._min_check and dropped > self._max_skip * read:
        raise DataError(
            f"{dropped} of the {read} examples read from {source.id!r} since start were "
            f"dropped because pre-processing failed on them (undecodable images or similar); "
            f"more than data.max_skip_fraction={self._max_skip}. Check the dataset (e.g. "
            "rebuild it with tools/build_dataset.py, which validates every image) or the pp.")

  def state(self) -> StreamState:
    """Stream state after the batches returned so far (what a checkpoint stores)."""
    st = self._state
    return StreamState(st.examples, list(st.positions), list(st.skipped), list(st.sources))

  def stats(self) -> dict[str, float]:
    """Dropped-example counts (total and per source) for the metrics."""
    st = self._state
    read = sum(st.positions)
    out = {"skipped": float(sum(st.skipped)),
           "skipped_fraction": float(sum(st.skipped)) / max(read, 1)}
    if len(self._sources) > 1:
      for j, s in enumerate(self._sources):
        out[f"skipped/{s.id}"] = float(st.skipped[j])
        out[f"examples/{s.id}"] = float(st.positions[j] - st.skipped[j])
    return out

  def close(self) -> None:
    """Releases the pipeline (its buffers and background threads)."""
    self._it = None


class ShardedInput:
  """This process's input as several stream shards whose batches are concatenated.

  The global batch is always `num_shards` shard batches in shard order, whichever process
  reads each shard, so the same config gives the same global batches (and the same numbers)
  on any number of processes that divides `num_shards`, and a checkpoint's per-shard
  positions resume exactly on another process count.
  """

  def __init__(self, iterators: Sequence[TrainIterator], first_shard: int):
    self._its = list(iterators)
    self.first_shard = first_shard

  def __iter__(self) -> "ShardedInput":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._its]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def states(self) -> list[StreamState]:
    """Stream state of each of this process's shards, in shard order."""
    return [it.state() for it in self._its]

  def stats(self) -> dict[str, float]:
    """Dropped-example counts (total and per source) over this process's shards."""
    totals: dict[str, float] = {}
    read = 0
    for it in self._its:
      st = it.state()
      read += sum(st.positions)
      for k, v in it.stats().items():
        if k != "skipped_fraction":
          totals[k] = totals.get(k, 0.0) + v
    totals["skipped_fraction"] = totals.get("skipped", 0.0) / max(read, 1)
    return totals

  def close(self) -> None:
    """Releases every shard's pipeline."""
    for it in self._its:
      it.close()
