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
Records that cannot be read (a missing shard, a corrupt or truncated one) keep their
positions too: every block yields exactly its number of records, the unreadable ones marked
and dropped before pre-processing, so positions stay a pure function of the stream. A
source none of whose records can be read for a whole epoch stops the stream (DataError).

Several sources are mixed by a stateless categorical draw per mixed index m. The state of
the stream is (m, next position of every source, drops per source): `TrainIterator.state()`
returns it after the batches consumed so far, and a stream started from that state yields
exactly what the uninterrupted stream would have yielded next.
"""

import dataclasses
import math
import sys
from typing import Any, Callable, Sequence

import numpy as np
from big_vlp.data import tf_cpu  # noqa: F401  (hides GPUs from TF first)
import tensorflow as tf

from big_vlp.config_errors import fail
from big_vlp.data import ops, pipeline

POSITION_KEY = "_position"
SOURCE_KEY = "_source"
UNREADABLE_KEY = "_unreadable"
_CHECK_EXAMPLES = 16  # Examples pre-processed eagerly at start-up to catch a broken pp.
_INT64_MAX = np.iinfo(np.int64).max
_PROBE_FILES = 64  # Files checked to explain a source that cannot be read.


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
  # Of the skipped positions, those whose records could not be read (missing, truncated or
  # corrupt files). States saved before this field existed count none.
  unreadable: list[int] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if not self.unreadable:
      self.unreadable = [0] * len(self.sources)

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
               [int(s) for s in d["skipped"]], list(d["sources"]),
               [int(u) for u in d.get("unreadable", [])])

  def to_array(self) -> np.ndarray:
    """Fixed-length int64 vector (for gathering across processes)."""
    return np.array([self.examples, *self.positions, *self.skipped, *self.unreadable],
                    np.int64)

  @classmethod
  def from_array(cls, a: np.ndarray, sources: list[str]) -> "StreamState":
    k = len(sources)
    a = [int(x) for x in np.asarray(a).reshape(-1)]
    return cls(a[0], a[1:1 + k], a[1 + k:1 + 2 * k], list(sources), a[1 + 2 * k:1 + 3 * k])


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


def _name(value: Any) -> str:
  """A file name (or label) from a str, bytes or a numpy/TF string scalar."""
  value = np.asarray(value).item()
  return value.decode() if isinstance(value, bytes) else str(value)


def openable(filename: Any) -> bool:
  """Whether `filename` (any tf.io.gfile path) exists and its first byte can be read."""
  try:
    with tf.io.gfile.GFile(_name(filename), "rb") as f:
      f.read(1)
    return True
  except Exception:  # pylint: disable=broad-except  # NotFound, permissions, I/O errors...
    return False


_WARNED: set[tuple[str, int]] = set()
_plain = pipeline.plain  # No AutoGraph for the tf.data functions here (see there).


def _warn_unreadable(label: Any, filename: Any, first: Any, end: Any, why: Any) -> np.int64:
  """Says once per process and block which records of which file are dropped as unreadable."""
  key = (_name(filename), int(first))
  if key not in _WARNED:
    _WARNED.add(key)
    print(f"warning: source {_name(label)!r}: records {int(first)}..{int(end) - 1} of "
          f"{key[0]}: {_name(why)}; the records that cannot be read are dropped, and counted "
          "in data/skipped and data/unreadable", file=sys.stderr, flush=True)
  return np.int64(0)


def _tfrecord_block_reader(label: str) -> Callable[..., tf.data.Dataset]:
  """(file, skip, take, openable) -> exactly `take` records of a block, b"" if unreadable."""
  @_plain
  def read(f, skip, take, opened):
    # TFRecordDataset retries opening a file forever under ignore_errors, so a file that
    # cannot be opened is not given to it at all.
    names = tf.reshape(f, [1])[:tf.cast(opened, tf.int32)]
    # A corrupt or truncated record ends TFRecordDataset's reading of its file (and it has
    # no other), so under ignore_errors the block ends early, at the damage.
    records = tf.data.TFRecordDataset(names).skip(skip).take(take).ignore_errors()

    @_plain
    def placeholder(i):
      why = tf.where(opened, "the file is corrupt or truncated from one of them on",
                     "the file is missing or cannot be opened")
      warned = tf.cond(tf.equal(i, 0), lambda: tf.reshape(tf.numpy_function(
          _warn_unreadable, [label, f, skip, skip + take, why], tf.int64, stateful=True), []),
          lambda: tf.constant(0, tf.int64))
      with tf.control_dependencies([warned]):
        return tf.constant(b"")
    # The rest of a short block: placeholders that keep every later record's position.
    return records.concatenate(tf.data.Dataset.range(take).map(placeholder)).take(take)
  return read


def _array_record_block_reader(label: str) -> Callable[..., tf.data.Dataset]:
  """(file, skip, take, openable) -> exactly `take` records of a block, b"" if unreadable."""
  from array_record.python.array_record_module import ArrayRecordReader

  def fetch(f, skip, take, opened):
    name, skip, take = _name(f), int(np.asarray(skip)), int(np.asarray(take))
    records, ok = [b""] * take, np.zeros([take], bool)
    why = "the file is missing or cannot be opened"
    reader = None
    try:
      if bool(np.asarray(opened)):
        reader = ArrayRecordReader(name)
        records, ok = list(reader.read(list(range(skip, skip + take)))), ~ok
    except Exception:  # pylint: disable=broad-except  # The reader raises several types.
      why = "the file cannot be read there (corrupt, truncated or gone)"
      for i in range(take if reader is not None else 0):  # Keep what can be read.
        try:
          records[i], ok[i] = reader.read([skip + i])[0], True
        except Exception:  # pylint: disable=broad-except
          pass
    finally:
      try:
        if reader is not None:
          reader.close()
      except Exception:  # pylint: disable=broad-except  # Closing a reader that never opened.
        pass
    if not ok.all():
      _warn_unreadable(label, name, skip, skip + take, why)
    return np.array(records, dtype=object)

  @_plain
  def read(f, skip, take, opened):
    records = tf.numpy_function(fetch, [f, skip, take, opened], tf.string, stateful=False)
    return tf.data.Dataset.from_tensor_slices(tf.reshape(records, [-1]))
  return read


def _block_reader(file_format: str, label: str) -> Callable[..., tf.data.Dataset]:
  """(file, skip, take, openable) -> a block's `take` serialized records, exactly.

  A record that cannot be read (the file is missing, or corrupt or truncated from some record
  on) comes as b"", so a block always fills its positions; a warning names the block. No
  dataset holds empty records (a tf.train.Example with any feature is not empty).
  """
  if file_format == "tfrecord":
    return _tfrecord_block_reader(label)
  if file_format == "array_record":
    return _array_record_block_reader(label)
  raise ValueError(f"file format {file_format!r} is not supported for training; "
                   "supported: tfrecord, array_record")


class _SourceStream:
  """The records of one source on one process, from a position on, as described above."""

  def __init__(self, blocks: _Blocks, file_format: str, key: int, window_blocks: int,
               block_size: int, label: str = ""):
    self.blocks = blocks
    self.key = key
    self.window_blocks = window_blocks
    self.window_records = window_blocks * block_size
    self.num_windows = -(-len(blocks.takes) // window_blocks)
    self._read_block = _block_reader(file_format, label)
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
    # Whether each block's file opens, asked ahead and in parallel: a remote file system
    # takes tens of milliseconds to answer.
    rows = rows.map(_plain(lambda f, s, t: (f, s, t, tf.reshape(tf.numpy_function(
        openable, [f], tf.bool, stateful=True), []))),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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
    return windows.flat_map(_plain(lambda w: self._window(
        epoch, w, tf.where(w == first_window, tf.constant(skip, tf.int64), 0))))

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
    """(position, serialized record or b"" if unreadable) from `position` on, forever."""
    epoch, window, skip = self.locate(position)
    first = self._epoch(epoch, window, skip)
    rest = tf.data.Dataset.range(epoch + 1, _INT64_MAX).flat_map(_plain(self._epoch))
    return tf.data.Dataset.zip(tf.data.Dataset.range(position, _INT64_MAX),
                               first.concatenate(rest))

  def counted_records(self, position: int, good_record: bytes) -> tf.data.Dataset:
    """(position, record, unreadable positions since `position`, dead) from `position` on.

    `dead` marks the records after a whole epoch's worth of unreadable ones in a row: then
    nothing of the source can be read, and the stream would wait forever for an example.
    They come as `good_record` (one that pre-processes), so that they reach TrainIterator,
    which stops with a DataError.
    """
    limit = self.blocks.epoch_size
    good = tf.constant(good_record)

    @_plain
    def count(state, element):
      run, total = state  # Unreadable positions in a row, and in all.
      position, record = element
      bad = tf.equal(tf.strings.length(record), 0)
      run = tf.where(bad, run + 1, 0)
      total += tf.cast(bad, tf.int64)
      dead = run >= limit
      return (run, total), (position, tf.where(dead, good, record), total, dead)

    zero = tf.constant(0, tf.int64)
    return self.records(position).scan((zero, zero), count)

  def head(self, n: int, max_blocks: int = 8) -> list[bytes]:
    """Up to n readable records from the first blocks on, in file order (start-up checks).

    Reads no further than `max_blocks` blocks once it has found one; until then, as far as
    it takes, so that [] means that no record of the source can be read.
    """
    b = self.blocks
    out: list[bytes] = []
    opens: dict[str, bool] = {}
    for i in range(len(b.takes)):
      if len(out) >= n or (out and i >= max_blocks):
        break
      f = b.files[i]
      if not opens.setdefault(f, openable(f)):
        continue
      ds = self._read_block(tf.constant(f), tf.constant(b.skips[i], tf.int64),
                            tf.constant(min(n - len(out), int(b.takes[i])), tf.int64),
                            tf.constant(True))
      out += [record for record in ds.as_numpy_iterator() if record]
    return out


def _unopenable_files(stream: _SourceStream, limit: int = _PROBE_FILES) -> tuple[int, list[str]]:
  """(files checked, those of them that cannot be opened) among the source's first files."""
  files = list(dict.fromkeys(stream.blocks.files))[:limit]
  return len(files), [f for f in files if not openable(f)]


# ----------------------------------------------------------------------------- the stream


def _unreadable_error(stream: _SourceStream, source: Source, when: str) -> DataError:
  """The error for a source none of whose records can be read."""
  checked, missing = _unopenable_files(stream)
  if missing:
    files = f"{len(missing)} of its first {checked} files cannot be opened, e.g. {missing[0]}"
  else:
    files = (f"its first {checked} files open, so their records are corrupt or later files "
             "are gone (the warnings above name them)")
  return DataError(
      f"no record of {source.id!r} can be read {when}: {files}. Check its data_dir, or "
      "whether the dataset was moved, deleted or changed after it was built (rebuild it "
      "with tools/build_dataset.py)")


def _check_pp(stream: _SourceStream, prepare: Callable, source: Source, field: str,
              pp: str) -> bytes:
  """A record of the source's first ones that pre-processes.

  Raises ConfigError if pre-processing fails on every one of them, and DataError if no
  record of the source can be read.
  """
  errors = []
  records = stream.head(_CHECK_EXAMPLES)
  if not records:
    raise _unreadable_error(stream, source, "at all")
  for i, record in enumerate(records):
    try:
      _, example = prepare(tf.constant(i, tf.int64), tf.constant(record))
      tf.nest.map_structure(lambda x: x.numpy(), example)
      return record
    except (tf.errors.OpError, ValueError, TypeError, KeyError) as e:
      errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
  fail(field, pp, f"fails on every one of the first {len(records)} examples of "
       f"{source.id!r}, so every example would be dropped; first error: {errors[0]} (if the "
       "pp is right, those examples are broken: rebuild the dataset with "
       "tools/build_dataset.py, which validates every image and caption)")


def _source_dataset(j: int, source: Source, *, pp: str, tokenizer: Any, seed: int,
                    position: int, process_index: int, process_count: int,
                    shuffle_buffer: int, block_size: int
                    ) -> tuple[tf.data.Dataset, _SourceStream]:
  """Pre-processed examples of one source (with `_source`, `_position`, `_unreadable`), bad
  and unreadable ones dropped; and the source's record stream."""
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
      seed, process_index, j), window_blocks, block_size, label=source.id)
  features = builder.info.features
  decoders = pipeline.image_decoders(features)

  def prepare(position, record):
    example = dict(features.deserialize_example(record, decoders=decoders))
    example[ops.SEED_KEY] = tf.stack([tf.constant(stream.key, tf.int64), position])
    example = preprocess(example)
    return position, {k: v for k, v in example.items() if k != ops.SEED_KEY}

  good_record = _check_pp(stream, prepare, source, pp_field, pp)

  def tag(position, example, unreadable):
    return {**example, POSITION_KEY: position, SOURCE_KEY: tf.constant(j, tf.int32),
            UNREADABLE_KEY: unreadable}

  @_plain
  def prepare_readable(position, record, unreadable, dead):
    # An unreadable record fails here, so that ignore_errors drops it like a bad example.
    readable = tf.debugging.Assert(tf.strings.length(record) > 0, ["unreadable record"])
    with tf.control_dependencies([readable]):
      position, example = prepare(position, tf.identity(record))
    return tf.where(dead, tf.constant(-1, tf.int64), position), example, unreadable

  ds = stream.counted_records(position, good_record)
  # Encoded records read ahead, so that refilling a window's shuffle buffer never
  # starves the (much slower) decoding below.
  ds = ds.prefetch(max(1024, min(shuffle_buffer // 4, 16_384)))
  ds = ds.map(prepare_readable, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.ignore_errors().map(_plain(tag)), stream


def train_iterator(sources: Sequence[Source], *, pp: str, tokenizer: Any,
                   local_batch_size: int, seed: int, start: "StreamState | int" = 0,
                   process_index: int = 0, process_count: int = 1,
                   shuffle_buffer: int = 50_000, block_size: int = 1024, prefetch: int = 2,
                   max_skip_fraction: float = 0.5,
                   min_examples_for_check: int = 1000) -> "TrainIterator":
  """Infinite stream of this process's numpy batches, resumed from `start`.

  `start` is a StreamState from `TrainIterator.state()` (exact), or a number of examples
  already consumed (exact when none was dropped). More than `max_skip_fraction` of a
  source's examples dropped since start raises DataError, once `min_examples_for_check` of
  them were read.
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
  datasets, streams = zip(*[
      _source_dataset(j, s, pp=pp, tokenizer=tokenizer, seed=seed, position=start.positions[j],
                      process_index=process_index, process_count=process_count,
                      shuffle_buffer=shuffle_buffer, block_size=block_size)
      for j, s in enumerate(sources)])
  if len(datasets) == 1:
    ds = datasets[0]
  else:
    logits = tf.math.log(tf.constant([weights], tf.float64) / sum(weights))
    mix_key = pipeline.stream_key(seed, process_index, len(sources), 0x6d6978)

    def draw(m):
      return tf.random.stateless_categorical(
          logits, 1, seed=tf.stack([tf.constant(mix_key, tf.int64), m]))[0, 0]

    selector = tf.data.Dataset.range(start.examples, _INT64_MAX).map(_plain(draw))
    ds = tf.data.Dataset.choose_from_datasets(list(datasets), selector)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(prefetch)
  # Parallel maps keep the order: exact resume needs it.
  return TrainIterator(ds.with_options(pipeline.deterministic_options()), start, sources,
                       max_skip_fraction, min_examples_for_check, streams)


class TrainIterator:
  """Numpy batches of the stream; keeps the stream state of what it has handed out."""

  def __init__(self, ds: tf.data.Dataset, state: StreamState, sources: Sequence[Source],
               max_skip_fraction: float, min_examples_for_check: int = 1000,
               streams: Sequence[_SourceStream] = ()):
    self._it = ds.as_numpy_iterator()
    self._state = dataclasses.replace(state, positions=list(state.positions),
                                      skipped=list(state.skipped),
                                      unreadable=list(state.unreadable))
    self._start = list(state.positions)
    self._start_skipped = list(state.skipped)
    self._start_unreadable = list(state.unreadable)
    self._streams = list(streams)
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
    unreadable = batch.pop(UNREADABLE_KEY)
    if (positions < 0).any():  # See `_SourceStream.counted_records`.
      j = int(sources[np.argmax(positions < 0)])
      self._it = None
      raise _unreadable_error(self._streams[j], self._sources[j], "for a whole epoch ("
                              f"{self._streams[j].blocks.epoch_size} records in a row)")
    st = self._state
    for j in range(len(st.positions)):
      mask = sources == j
      mine = positions[mask]
      if len(mine):
        end = int(mine.max()) + 1
        st.skipped[j] += end - st.positions[j] - len(mine)
        st.positions[j] = end
        # Each example carries the unreadable positions before it since the stream started.
        st.unreadable[j] = self._start_unreadable[j] + int(unreadable[mask].max())
    st.examples += len(sources)
    self._check_skips()
    return batch

  def _check_skips(self) -> None:
    for j, source in enumerate(self._sources):
      read = self._state.positions[j] - self._start[j]
      dropped = self._state.skipped[j] - self._start_skipped[j]
      if read >= self._min_check and dropped > self._max_skip * read:
        unreadable = self._state.unreadable[j] - self._start_unreadable[j]
        raise DataError(
            f"{dropped} of the {read} examples read from {source.id!r} since start were "
            f"dropped: {dropped - unreadable} because pre-processing failed on them "
            f"(undecodable images, empty captions or similar), {unreadable} because their "
            "records could not be read (missing, truncated or corrupt files; the warnings "
            f"name them); more than data.max_skip_fraction={self._max_skip}. Check the "
            "dataset (e.g. rebuild it with tools/build_dataset.py, which validates every "
            "image and caption) or the pp.")

  def state(self) -> StreamState:
    """Stream state after the batches returned so far (what a checkpoint stores)."""
    st = self._state
    return StreamState(st.examples, list(st.positions), list(st.skipped), list(st.sources),
                       list(st.unreadable))

  def stats(self) -> dict[str, float]:
    """Dropped-example counts, total and per source (`unreadable`: those never read)."""
    st = self._state
    read = sum(st.positions)
    out = {"skipped": float(sum(st.skipped)),
           "skipped_fraction": float(sum(st.skipped)) / max(read, 1),
           "unreadable": float(sum(st.unreadable))}
    if len(self._sources) > 1:
      for j, s in enumerate(self._sources):
        out[f"skipped/{s.id}"] = float(st.skipped[j])
        out[f"unreadable/{s.id}"] = float(st.unreadable[j])
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
