"""The training stream: windowed shuffling, exact resume from a state, dropped examples
counted exactly, weighted mixtures, disjoint process slices of every source."""

import collections
import hashlib
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from big_vlp.config_errors import ConfigError
from big_vlp.data import stream
from big_vlp.data.tokenizers import ByteTokenizer
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)

RAW = "keep('image', 'label')"  # Encoded PNG bytes identify an example; cheap.
SMALL_WINDOWS = dict(block_size=64, shuffle_buffer=256)  # 4 blocks per window.


def digest(png: bytes) -> str:
  return hashlib.sha1(png).hexdigest()[:12]


def file_order(data_dir, split):
  ds = tfds.builder(SMALL, data_dir=data_dir).as_dataset(
      split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return {digest(e["image"]): (i, int(e["label"])) for i, e in enumerate(tfds.as_numpy(ds))}


def source(split="train", weight=1.0, **kw):
  return stream.Source(name=SMALL, split=split, weight=weight, **kw)


def open_stream(data_dir, sources=None, *, pp=RAW, batch=10, seed=0, **kwargs):
  sources = sources or [source()]
  sources = [stream.Source(**{**s.__dict__, "data_dir": data_dir}) for s in sources]
  args = dict(SMALL_WINDOWS, pp=pp, tokenizer=ByteTokenizer(), local_batch_size=batch,
              seed=seed)
  args.update(kwargs)
  return stream.train_iterator(sources, **args)


def ids(batches):
  return [digest(x) for b in batches for x in b["image"]]


def test_make_blocks_cuts_file_instructions():
  fi = collections.namedtuple("FI", "filename skip take examples_in_shard")
  blocks = stream.make_blocks([fi("a", 0, 150, 150), fi("b", 30, -1, 100)], 64)
  assert list(blocks.files) == ["a", "a", "a", "b", "b"]
  assert list(blocks.skips) == [0, 64, 128, 30, 94]
  assert list(blocks.takes) == [64, 64, 22, 64, 6]
  assert blocks.epoch_size == 220


def test_epochs_are_permutations_and_windows_mix_blocks(shapes_dir):
  order = file_order(shapes_dir, "train[:50%]")  # Process 0 of 2 reads the first half.
  got = ids(itertools.islice(open_stream(shapes_dir, process_count=2, batch=100), 20))
  first, second = got[:1000], got[1000:]
  assert sorted(first) == sorted(order) and sorted(second) == sorted(order)
  assert first != second
  # The first window (256 records) holds 4 random blocks of 64: records of 4 different
  # blocks, from all over the slice, in shuffled order.
  window = [order[d][0] for d in first[:256]]
  assert len({i // 64 for i in window}) == 4
  assert max(window) - min(window) > 300 and window != sorted(window)


@pytest.mark.parametrize("k", [13, 25, 100, 133])  # Inside a window, window start, epoch
def test_resume_from_example_count_is_exact(shapes_dir, k):  # boundary, next epoch.
  kwargs = dict(process_index=1, process_count=2, seed=3, pp="decode|random_crop(40)|"
                "flip_lr|value_range(-1, 1)|tokenize(8, key='caption')|keep('image', 'text')")
  reference = list(itertools.islice(open_stream(shapes_dir, **kwargs), 150))
  resumed = list(itertools.islice(open_stream(shapes_dir, start=k * 10, **kwargs), 150 - k))
  for want, got in zip(reference[k:], resumed):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_dropped_examples_are_counted_exactly_and_resume_is_exact(shapes_dir):
  bad = (0, 7, 13)  # 3 of 48 classes.
  pp = RAW + f"|fail_on_label{bad}"
  plain = ids(itertools.islice(open_stream(shapes_dir, batch=50), 60))  # Positions 0..2999.
  order = file_order(shapes_dir, "train")
  kept = [d for d in plain if order[d][1] not in bad]

  it = open_stream(shapes_dir, pp=pp, batch=50)
  first = list(itertools.islice(it, 20))
  state = it.state()
  assert ids(first) == kept[:1000]
  # The state points just after the 1000th kept example; the drops before it are counted.
  assert plain[state.positions[0] - 1] == kept[999]
  assert state.skipped == [state.positions[0] - 1000] and state.skipped[0] > 0
  assert state.examples == 1000
  assert it.stats()["skipped"] == state.skipped[0]

  rest = list(itertools.islice(open_stream(shapes_dir, pp=pp, batch=50, start=state), 10))
  assert ids(rest) == kept[1000:1500]
  it_more = list(itertools.islice(it, 10))
  assert ids(it_more) == ids(rest)


def test_too_many_dropped_examples_stop_the_stream(shapes_dir):
  pp = RAW + "|fail_on_label" + str(tuple(range(0, 48, 3)))  # A third of all examples.
  it = open_stream(shapes_dir, pp=pp, batch=50, max_skip_fraction=0.2)
  with pytest.raises(stream.DataError, match=r"dropped.*max_skip_fraction=0.2"):
    list(itertools.islice(it, 40))
  it = open_stream(shapes_dir, pp=pp, batch=50, max_skip_fraction=0.5)
  assert len(list(itertools.islice(it, 40))) == 40


def test_a_pp_failing_on_everything_is_a_config_error(shapes_dir):
  with pytest.raises(ConfigError, match=r"config\.data\.pp=.*central_crop.*fails on every one "
                     r"of the first 16 examples.*first error"):
    open_stream(shapes_dir, pp="decode|central_crop(100)|keep('image')")


def test_mixture_follows_weights_keeps_each_source_order_and_resumes(shapes_dir):
  sources = [source("train", 3.0), source("val", 1.0)]
  train_ids = ids(itertools.islice(open_stream(shapes_dir, [source("train")], batch=50), 20))
  it = open_stream(shapes_dir, sources, batch=50)
  mixed = ids(itertools.islice(it, 20))
  state = it.state()
  from_train = [d for d in mixed if d in set(train_ids)]
  from_val = [d for d in mixed if d not in set(train_ids)]
  assert 0.71 < len(from_train) / len(mixed) < 0.79
  # Each source contributes its own stream, in order (the val stream is keyed as source 1).
  assert from_train == train_ids[:len(from_train)]
  assert len(set(from_val)) == min(len(from_val), 200) and set(from_val) <= set(file_order(
      shapes_dir, "val"))
  assert state.positions == [len(from_train), len(from_val)] and state.examples == 1000
  assert it.stats()[f"examples/{SMALL}:val"] == len(from_val)
  more = ids(itertools.islice(it, 5))
  assert ids(itertools.islice(open_stream(shapes_dir, sources, batch=50, start=state), 5)) == more


def test_processes_read_disjoint_parts_of_every_source(shapes_dir):
  sources = [source("train", 10.0), source("val", 1.0)]
  seen = []
  for process in range(2):
    it = open_stream(shapes_dir, sources, batch=50, process_index=process, process_count=2)
    seen.append(set(ids(itertools.islice(it, 60))))  # > one epoch of both half-sources.
  everything = set(file_order(shapes_dir, "train")) | set(file_order(shapes_dir, "val"))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == everything


def test_mixture_errors_name_the_source(shapes_dir):
  with pytest.raises(ConfigError, match=r"config\.data\.mixture\.b\.weight=0"):
    open_stream(shapes_dir, [source(field="data.mixture.a"),
                             source(weight=0, field="data.mixture.b")])
  with pytest.raises(ConfigError, match=r"config\.data\.mixture\.b\.split='dev'.*test, train"):
    open_stream(shapes_dir, [source(field="data.mixture.a"),
                             source("dev", field="data.mixture.b")])


def test_state_round_trips_through_json_and_arrays():
  st = stream.StreamState(10**12 + 5, [3, 2**40], [1, 7], ["a:train", "b:train"], [0, 5])
  assert stream.StreamState.from_json(st.to_json()) == st
  assert stream.StreamState.from_array(st.to_array(), st.sources) == st
  # States saved before unreadable records were counted apart: none was.
  old = {k: v for k, v in st.to_json().items() if k != "unreadable"}
  assert stream.StreamState.from_json(old).unreadable == [0, 0]
  assert stream.StreamState(0, [0], [0], ["a:train"]).unreadable == [0]
  legacy = stream.StreamState.start([source(weight=3.0), source("val", 1.0)], 1001)
  assert sum(legacy.positions) == 1001 and legacy.skipped == [0, 0]


def test_array_record_datasets_read_and_resume_the_same_way(tmp_path):
  from big_vlp.data import shapes
  builder = shapes.BigVlpShapes(config="small", data_dir=str(tmp_path),
                                file_format="array_record")
  builder.download_and_prepare()
  assert builder.info.file_format.value == "array_record"
  args = dict(pp="keep('image')", tokenizer=None, local_batch_size=50, seed=0, **SMALL_WINDOWS)
  src = [source(data_dir=str(tmp_path))]
  got = ids(itertools.islice(stream.train_iterator(src, **args), 40))
  assert len(set(got[:2000])) == 2000  # An epoch is a permutation of the split.
  resumed = ids(itertools.islice(stream.train_iterator(src, start=1300, **args), 14))
  assert resumed == got[1300:2000]
