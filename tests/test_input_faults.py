"""Faults in real training data on disk: corrupt images, blank and huge captions, shards that
are corrupt, truncated or missing. The datasets are written like tools/build_dataset.py
writes them (same records, same tfds metadata) but without its validation, as a dataset
prepared elsewhere would be."""

import io
import itertools
import os
import re

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from big_vlp.data import build, ops, stream
from big_vlp.data.tokenizers import ByteTokenizer

PP = "decode|value_range(-1, 1)|choice|tokenize(16)|keep('image', 'text', 'key')"
KEYS = "keep('key')"  # Reads every record, whatever its image: the stream's order.
WINDOWS = dict(block_size=32, shuffle_buffer=128)  # 4 blocks per window.
EOS = ByteTokenizer.eos_id


def jpeg(i: int) -> bytes:
  """A valid 8x8 JPEG, different for each i."""
  pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG")
  return out.getvalue()


def corrupt_image(i: int) -> bytes:
  """Bytes that no decoder accepts, of several kinds."""
  good = jpeg(i)
  return [good[:len(good) // 2],  # Truncated JPEG.
          np.random.default_rng(i).bytes(64),  # Random bytes.
          b"",  # Empty.
          b"\x89PNG\r\n\x1a\n" + bytes(40)][i % 4]  # A PNG header, then nothing valid.


def write_dataset(data_dir: str, name: str, images: list[bytes], captions: list[str],
                  shards: int = 1) -> list[str]:
  """Writes the pairs as they are into a tfds dataset of `shards` files; returns the files."""
  version_dir = os.path.join(data_dir, name, build.VERSION)
  os.makedirs(version_dir)
  per_shard = -(-len(images) // shards)
  files, lengths = [], []
  for s in range(shards):
    path = os.path.join(version_dir, f"{name}-train.tfrecord-{s:05d}-of-{shards:05d}")
    indices = range(s * per_shard, min(len(images), (s + 1) * per_shard))
    with tf.io.TFRecordWriter(path) as writer:
      for i in indices:
        writer.write(build.serialize_example({
            "image": build._bytes_feature([images[i]]),
            "caption": build._bytes_feature([captions[i].encode()]),
            "key": build._bytes_feature([str(i).encode()]),
            "meta": build._bytes_feature([b""])}))
    files.append(path)
    lengths.append(len(indices))
  tfds.folder_dataset.write_metadata(
      data_dir=version_dir, features=build._features("text", None),
      split_infos=[tfds.core.SplitInfo(name="train", shard_lengths=lengths,
                                       num_bytes=sum(os.path.getsize(f) for f in files))],
      check_data=False)
  return files


def open_stream(data_dir: str, *names: str, pp: str = PP, batch: int = 20, **kwargs):
  sources = [stream.Source(name=n, data_dir=data_dir, weight=w)
             for n, w in zip(names, kwargs.pop("weights", [1.0] * len(names)))]
  args = dict(WINDOWS, pp=pp, tokenizer=ByteTokenizer(), local_batch_size=batch, seed=0,
              min_examples_for_check=100)
  return stream.train_iterator(sources, **{**args, **kwargs})


def keys(batches) -> list[int]:
  return [int(k) for b in batches for k in b["key"]]


def stream_order(data_dir: str, name: str, n: int) -> list[int]:
  """The keys at the first n positions of the stream."""
  return keys(itertools.islice(open_stream(data_dir, name, pp=KEYS, batch=n), 1))


# ----------------------------------------------------------------------------- examples


def test_corrupt_images_are_dropped_and_counted(tmp_path):
  n = 200
  bad = {i for i in range(n) if i % 10 == 5}  # 10%, of 4 kinds.
  write_dataset(str(tmp_path), "pairs10", [corrupt_image(i) if i in bad else jpeg(i)
                                           for i in range(n)], [f"photo {i}" for i in range(n)])
  order = stream_order(str(tmp_path), "pairs10", 2 * n)
  it = open_stream(str(tmp_path), "pairs10")
  got = keys(itertools.islice(it, 18))  # 360 examples: all the good ones of two epochs.
  assert got == [k for k in order if k not in bad]
  state = it.state()
  read = order.index(got[-1], n) + 1  # The last good one is in the second epoch.
  skipped = sum(k in bad for k in order[:read])
  assert state.positions == [read] and state.skipped == [skipped] and state.unreadable == [0]
  assert skipped == 2 * len(bad) - sum(k in bad for k in order[read:])
  assert it.stats() == {"skipped": skipped, "skipped_fraction": skipped / read,
                        "unreadable": 0.0}


def test_mostly_corrupt_images_stop_with_a_data_error(tmp_path):
  n = 200
  good = {i for i in range(n) if i % 10 == 0}  # 90% corrupt; the first record is fine.
  write_dataset(str(tmp_path), "pairs90", [jpeg(i) if i in good else corrupt_image(i)
                                           for i in range(n)], [f"photo {i}" for i in range(n)])
  it = open_stream(str(tmp_path), "pairs90", batch=5)
  with pytest.raises(stream.DataError) as e:
    list(itertools.islice(it, 100))
  message = str(e.value)
  dropped, read = map(int, re.match(r"(\d+) of the (\d+) examples read from 'pairs90:train' "
                                    r"since start were dropped", message).groups())
  assert read >= 100 and dropped > read / 2 and read - dropped <= 10 * 5
  assert f"{dropped} because pre-processing failed" in message
  assert "0 because their records could not be read" in message
  assert "max_skip_fraction=0.5" in message and "tools/build_dataset.py" in message


def test_blank_captions_are_dropped_and_long_ones_truncated_with_eos_last(tmp_path):
  n = 120
  blank = {i: ["", " ", "\t\n", "\u00a0\u3000", "\ufeff "][i % 5] for i in range(0, n, 6)}
  long = {i: "x" * 10_000 for i in range(3, n, 6)}
  captions = [blank.get(i, long.get(i, f"Photo {i}")) for i in range(n)]
  write_dataset(str(tmp_path), "captions", [jpeg(i) for i in range(n)], captions)
  order = stream_order(str(tmp_path), "captions", n)
  it = open_stream(str(tmp_path), "captions")
  batches = list(itertools.islice(it, 5))  # The 100 examples with text: one epoch.
  assert keys(batches) == [k for k in order if k not in blank]
  read = order.index(keys(batches)[-1]) + 1
  assert it.state().positions == [read] and it.state().skipped == [read - 100]
  texts = np.concatenate([b["text"] for b in batches])
  for k, text in zip(keys(batches), texts):
    want = list(captions[k].lower().encode())[:15]
    assert list(text) == [b + 2 for b in want] + [EOS] + [0] * (15 - len(want)), k
  assert sum(k in long for k in keys(batches)) == len(long)


def test_choice_never_picks_a_blank_caption():
  fn = ops.get_preprocess_fn("choice")

  def picks(captions, seeds):
    ds = tf.data.Dataset.from_tensor_slices(tf.constant([[0, s] for s in seeds], tf.int64))
    ds = ds.map(lambda seed: fn({"caption": tf.constant(captions), ops.SEED_KEY: seed}))
    return [ex["caption"] for ex in ds.as_numpy_iterator()]

  assert set(picks(["", "a dog", " \t", "a cat", "\u00a0"], range(20))) == {b"a dog", b"a cat"}
  assert picks("one", [0]) == [b"one"] and picks([" x "], [0]) == [b" x "]
  for nothing in (["", "  "], " \n", "", tf.constant([], tf.string)):
    with pytest.raises(tf.errors.InvalidArgumentError, match="nothing to pick"):
      picks(nothing, [0])


# ----------------------------------------------------------------------------- files


def readable_records(path: str) -> int:
  """How many records TFRecordDataset reads from a file before it fails or ends."""
  return sum(1 for _ in tf.data.TFRecordDataset(path).ignore_errors())


def test_corrupt_truncated_and_missing_shards_are_skipped_counted_and_resume(tmp_path,
                                                                              capfd):
  n, shards = 400, 5  # 80 records per shard, in blocks of 32, 32 and 16.
  write_dataset(str(tmp_path / "intact"), "shards", [jpeg(i) for i in range(n)],
                [f"photo {i}" for i in range(n)], shards)
  files = write_dataset(str(tmp_path / "damaged"), "shards", [jpeg(i) for i in range(n)],
                        [f"photo {i}" for i in range(n)], shards)
  data = bytearray(open(files[2], "rb").read())
  middle = len(data) // 2
  data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
  open(files[2], "wb").write(data)  # Corrupt bytes in the middle of a shard,
  os.remove(files[3])  # a shard deleted,
  with open(files[4], "r+b") as f:  # and one truncated after the dataset was built.
    f.truncate(os.path.getsize(files[4]) * 2 // 3)
  readable = {2: readable_records(files[2]), 3: 0, 4: readable_records(files[4])}
  assert 30 < readable[2] < 50 and 45 < readable[4] < 60  # Over 200 readable per epoch.

  def ok(k):  # Each shard is read up to its first unreadable record.
    return k % 80 < readable.get(k // 80, 80)

  order = stream_order(str(tmp_path / "intact"), "shards", 2 * n)
  expected = [k for k in order if ok(k)]
  it = open_stream(str(tmp_path / "damaged"), "shards", max_skip_fraction=0.9)
  first = keys(itertools.islice(it, 10))
  assert first == expected[:200]
  state = it.state()
  read = order.index(expected[199]) + 1
  assert state.positions == [read] and state.skipped == state.unreadable == [read - 200]
  more = keys(itertools.islice(it, 10))
  assert more == expected[200:400]
  read = order.index(expected[399], n) + 1  # In the second epoch.
  assert it.state().positions == [read]
  assert it.stats()["unreadable"] == it.stats()["skipped"] == read - 400
  # Resuming repeats exactly what the stream gave after the state, and its counts.
  resumed = open_stream(str(tmp_path / "damaged"), "shards", start=state,
                        max_skip_fraction=0.9)
  assert keys(itertools.islice(resumed, 10)) == more
  assert resumed.state() == it.state()
  err = capfd.readouterr().err
  for shard, why in ((2, "corrupt or truncated"), (3, "missing"), (4, "corrupt or truncated")):
    first = readable[shard] // 32 * 32  # The block of the first unreadable record.
    assert re.search(rf"records {first}\.\.{min(first + 32, 80) - 1} of "
                     rf"{re.escape(files[shard])}: the file is {why}", err), (shard, err)


def test_a_source_that_cannot_be_read_at_all_is_a_data_error(tmp_path):
  files = write_dataset(str(tmp_path), "gone", [jpeg(i) for i in range(100)],
                        ["photo"] * 100, shards=2)
  for f in files:
    os.remove(f)
  with pytest.raises(stream.DataError, match=r"no record of 'gone:train' can be read at all: "
                     r"2 of its first 2 files cannot be opened, e\.g\. .*gone-train.*"
                     r"tools/build_dataset\.py"):
    open_stream(str(tmp_path), "gone")


def test_a_source_whose_files_vanish_while_training_stops_the_mixture(tmp_path):
  write_dataset(str(tmp_path), "kept", [jpeg(i) for i in range(100)], ["photo"] * 100)
  files = write_dataset(str(tmp_path), "vanishing", [jpeg(i) for i in range(64)],
                        ["photo"] * 64, shards=2)
  it = open_stream(str(tmp_path), "kept", "vanishing", batch=10, max_skip_fraction=1.0)
  next(it)
  for f in files:
    os.remove(f)
  with pytest.raises(stream.DataError, match=r"no record of 'vanishing:train' can be read for "
                     r"a whole epoch \(64 records in a row\): 2 of its first 2 files cannot be "
                     "opened"):
    for _ in range(1000):  # What was read before the files went still comes first.
      next(it)
