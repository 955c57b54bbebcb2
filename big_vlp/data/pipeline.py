"""Dataset access (tfds builders, splits, process slices) and the padded evaluation input.

The training stream (seekable shuffling, mixtures, dropped bad examples, exact resume) is
in `big_vlp.data.stream`; `train_iterator` here is its one-dataset form.
"""

import atexit
import os
import re
from typing import Any, Iterator
import weakref

import numpy as np
from big_vlp.data import tf_cpu  # noqa: F401  (hides GPUs from TF first)
import tensorflow as tf
import tensorflow_datasets as tfds

from big_vlp.config_errors import fail
from big_vlp.data import ops
from big_vlp.data import shapes
from big_vlp.data.tokenizers import Tokenizer

# For the functions given to tf.data here, in stream.py and in tools/teacher_embeddings.py:
# none has Python control flow on tensors, so AutoGraph's conversion would only add tracing
# time to the start of every pipeline, the training stream's and each evaluator's (5 s of a
# FILIP demo run under cProfile; about 1 s of a demo run without it, within the noise).
plain = tf.autograph.experimental.do_not_convert

Batch = dict[str, np.ndarray]
SHAPES_NAME = "big_vlp_shapes"
MASK_KEY = "_mask"


class BatchIterator:
  """Iterates numpy batches of a tf.data pipeline; `close()` stops its threads."""

  def __init__(self, ds: tf.data.Dataset):
    self._it = ds.as_numpy_iterator()
    register_live_iterator(self)

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> Batch:
    if self._it is None:
      raise StopIteration
    return next(self._it)

  def close(self) -> None:
    """Releases the pipeline (its buffers and background threads)."""
    self._it = None


# A tf.numpy_function (SentencePiece tokenization) still running in a tf.data thread while
# Python shuts down aborts the process ("terminate called without an active exception"),
# so every live pipeline is released before interpreter teardown.
_LIVE_ITERATORS: "weakref.WeakSet[Any]" = weakref.WeakSet()
atexit.register(lambda: [it.close() for it in list(_LIVE_ITERATORS)])


def register_live_iterator(iterator: Any) -> None:
  """Makes sure `iterator.close()` runs before interpreter teardown."""
  _LIVE_ITERATORS.add(iterator)


def _data_dir(data_dir: str | None) -> str:
  return os.fspath(data_dir) if data_dir is not None else tfds.core.constants.DATA_DIR


def available_datasets(data_dir: str | None) -> list[str]:
  """Prepared datasets under data_dir, as 'name' or 'name/config' (all versions merged)."""
  root = _data_dir(data_dir)
  found = set()
  for depth in ("*/*", "*/*/*"):
    for info in tf.io.gfile.glob(os.path.join(root, depth, "dataset_info.json")):
      parts = os.path.relpath(os.path.dirname(info), root).split(os.sep)
      found.add("/".join(parts[:-1]))  # Drop the version directory.
  return sorted(found)


def get_builder(name: str, data_dir: str | None, *,
                field: str = "data.name") -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for `name`; big_vlp_shapes is generated on first use."""
  base, _, config = name.partition("/")
  if base == SHAPES_NAME:
    if config and config not in shapes.CONFIG_NAMES:
      fail(field, name, "unknown config; available: "
           + ", ".join(f"{SHAPES_NAME}/{c}" for c in shapes.CONFIG_NAMES))
    return shapes.ensure_built(data_dir, config or "default")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception:  # tfds raises several types for unknown / unreadable names.
    prepared = False
  if not prepared:
    present = available_datasets(data_dir)
    fail(field, name, f"no prepared tfds dataset of that name in {_data_dir(data_dir)!r}; "
         "datasets there: " + (", ".join(present) if present else "(none)")
         + f"; {SHAPES_NAME}[/config] is built automatically")
  return builder


def check_split(builder: tfds.core.DatasetBuilder, split: str, field: str) -> None:
  """Raises ConfigError unless every split named in `split` (e.g. 'train[:90%]') exists."""
  present = list(builder.info.splits.keys())
  for part in split.split("+"):
    base = re.split(r"[\[(]", part.strip(), maxsplit=1)[0].strip()
    if base not in present:
      fail(field, split, f"dataset {builder.info.full_name!r} has no split {base!r}; "
           "splits there: " + ", ".join(sorted(present)))
  try:
    builder.info.splits[split]
  except Exception as e:  # Malformed slicing, e.g. 'train[:200%]'.
    fail(field, split, f"cannot be read: {e}")


def process_split(split: str, process_index: int, process_count: int) -> Any:
  """This process's disjoint, contiguous part of `split`."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]


def _read(builder, split: str) -> tf.data.Dataset:
  """Records of `split` in file order; image features stay encoded (decoded by the pp ops)."""
  decoders = image_decoders(builder.info.features)
  read_config = tfds.ReadConfig(shuffle_seed=None, interleave_cycle_length=1,
                                add_tfds_id=False, try_autocache=False)
  return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                            read_config=read_config)


def image_decoders(features: Any) -> dict[str, Any] | None:
  """tfds decoders that leave every Image feature encoded (the pp's `decode` op decodes)."""
  decoders = {k: tfds.decode.SkipDecoding() for k, f in features.items()
              if isinstance(f, tfds.features.Image)}
  return decoders or None


def stream_key(*parts: int) -> int:
  """A well-mixed int64 from integers (seed, process, source ...) keying random numbers."""
  state = np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]
  return int(state.astype(np.int64))


def num_examples(name: str, split: str, data_dir: str | None) -> int:
  """Number of examples in `split` (slicing syntax allowed)."""
  builder = get_builder(name, data_dir)
  check_split(builder, split, "data.split")
  return builder.info.splits[split].num_examples


def class_names(name: str, data_dir: str | None, key: str = "label", *,
                field: str = "label_key") -> list[str]:
  """Names of the ClassLabel feature `key`, in label order."""
  builder = get_builder(name, data_dir)
  features = builder.info.features
  feature = features[key] if key in features.keys() else None
  if not isinstance(feature, tfds.features.ClassLabel):
    labels = [k for k, f in builder.info.features.items()
              if isinstance(f, tfds.features.ClassLabel)]
    fail(field, key, f"dataset {name!r} has no ClassLabel feature of that name; "
         "ClassLabel features: " + (", ".join(labels) if labels else "(none)"))
  return list(feature.names)


def iterate_texts(name: str, split: str, data_dir: str | None, key: str = "caption",
                  limit: int | None = None) -> Iterator[str]:
  """Yields the strings of feature `key` (each one of a list), e.g. to train a tokenizer."""
  builder = get_builder(name, data_dir)
  check_split(builder, split, "data.split")
  if key not in builder.info.features:
    fail("data.text_key", key, f"dataset {name!r} has no feature of that name; features: "
         + ", ".join(builder.info.features.keys()))
  # Batched, because fetching scalars one by one from tf.data costs ~0.3 ms each.
  ds = _read(builder, split).map(plain(lambda ex: tf.reshape(ex[key], [-1])))
  ds = ds.unbatch().batch(1024)
  count = 0
  for values in ds.as_numpy_iterator():
    for text in values:
      if limit is not None and count >= limit:
        return
      yield text.decode("utf-8")
      count += 1


def deterministic_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps must keep the order.
  return options


def train_iterator(*, name: str, split: str, data_dir: str | None, pp: str,
                   tokenizer: Tokenizer | None, local_batch_size: int, seed: int,
                   start_example: int = 0, process_index: int = 0, process_count: int = 1,
                   shuffle_buffer: int = 50_000, config_prefix: str = "data",
                   **kwargs) -> Any:
  """Infinite stream of this process's numpy batches of one dataset (see `stream`).

  Resuming with start_example = k * local_batch_size yields exactly the batches that a
  stream started at 0 yields from batch k on, when no example was dropped; for the general
  case pass `start=` a `stream.StreamState`. Config errors name `{config_prefix}.<field>`.
  """
  from big_vlp.data import stream  # pylint: disable=import-outside-toplevel
  source = stream.Source(name=name, split=split, data_dir=data_dir, field=config_prefix)
  return stream.train_iterator(
      [source], pp=pp, tokenizer=tokenizer, local_batch_size=local_batch_size, seed=seed,
      start=kwargs.pop("start", start_example), process_index=process_index,
      process_count=process_count, shuffle_buffer=shuffle_buffer, **kwargs)


def eval_iterator(*, name: str, split: str, data_dir: str | None, pp: str,
                  tokenizer: Tokenizer | None,
                  batch_size: int, process_index: int = 0, process_count: int = 1,
                  config_prefix: str = "data") -> BatchIterator:
  """Every example of this process's slice once, in file order, in equal-shape batches.

  The last batch is zero-padded; `_mask` (bool [batch]) is False on padding. All processes
  yield the same number of batches, so multi-host evaluation loops stay in lock-step.
  """
  builder = get_builder(name, data_dir, field=f"{config_prefix}.name")
  check_split(builder, split, f"{config_prefix}.split")
  preprocess = ops.get_preprocess_fn(pp, tokenizer, field=f"{config_prefix}.pp")
  sizes = [builder.info.splits[process_split(split, i, process_count)].num_examples
           for i in range(process_count)]
  num_batches = -(-max(sizes) // batch_size)
  key = stream_key(0, process_index)

  def prepare(position, example):
    example = dict(example)
    example[ops.SEED_KEY] = tf.stack([tf.constant(key, tf.int64), position])
    example = {k: v for k, v in preprocess(example).items() if k != ops.SEED_KEY}
    example[MASK_KEY] = tf.constant(True)
    return example

  ds = tf.data.Dataset.zip(tf.data.Dataset.range(np.iinfo(np.int64).max),
                           _read(builder, process_split(split, process_index,
                                                         process_count)))
  ds = ds.map(plain(prepare), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = num_batches * batch_size - sizes[process_index]
  if padding:
    ds = ds.concatenate(_padding(ds, sizes[process_index] > 0, f"{config_prefix}.pp", pp)
                        .repeat(padding))
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
  return BatchIterator(ds.with_options(deterministic_options()))


def _padding(ds: tf.data.Dataset, has_examples: bool, field: str, pp: str) -> tf.data.Dataset:
  """One all-zero example (`_mask` False) shaped like the examples of `ds`."""
  if has_examples:  # Zeros like a real example: works when static shapes are unknown.
    return ds.take(1).map(plain(lambda ex: tf.nest.map_structure(tf.zeros_like, ex))).cache()
  for key, spec in ds.element_spec.items():
    if not spec.shape.is_fully_defined():
      fail(field, pp, f"this process has no examples to pad like, and {key!r} has no static "
           f"shape ({spec.shape}); add a resize op")
  return tf.data.Dataset.from_tensors(
      {k: tf.zeros(s.shape, s.dtype) for k, s in ds.element_spec.items()})
