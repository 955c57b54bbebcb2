"""Input pipelines: process slices, exact resume, padded evaluation, dataset errors."""

import hashlib
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from big_vlp.config_errors import ConfigError
from big_vlp.data import pipeline
from big_vlp.data.tokenizers import ByteTokenizer
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)

AUGMENT = ("decode|random_crop(48)|flip_lr|value_range(-1, 1)|tokenize(12)"
           "|keep('image', 'text')")
RAW = "keep('image')"  # Encoded PNG bytes: cheap, and they identify an example.


def digest(png: bytes) -> str:
  return hashlib.sha1(png).hexdigest()


def split_digests(data_dir: str, split: str) -> list[str]:
  builder = tfds.builder(SMALL, data_dir=data_dir)
  ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return [digest(e["image"]) for e in tfds.as_numpy(ds)]


def train(data_dir, **kwargs):
  args = dict(name=SMALL, split="train", data_dir=data_dir, pp=RAW, tokenizer=ByteTokenizer(),
              local_batch_size=100, seed=0)
  args.update(kwargs)
  return pipeline.train_iterator(**args)


def test_train_batches_have_the_pp_layout(shapes_dir):
  batch = next(train(shapes_dir, pp=AUGMENT, local_batch_size=8))
  assert set(batch) == {"image", "text"}
  assert batch["image"].shape == (8, 48, 48, 3) and batch["image"].dtype == np.float32
  assert -1 <= batch["image"].min() < batch["image"].max() <= 1
  assert batch["text"].shape == (8, 12) and batch["text"].dtype == np.int32
  assert np.all((batch["text"] == 1).sum(axis=1) == 1)  # One EOS per caption.


def test_process_slices_are_disjoint_and_cover_the_split(shapes_dir):
  epochs = {}
  for process in range(2):
    it = train(shapes_dir, process_index=process, process_count=2)
    seen = [digest(x) for b in itertools.islice(it, 20) for x in b["image"]]
    epochs[process] = (seen[:1000], seen[1000:])
    assert len(set(seen[:1000])) == 1000  # One slice epoch is a permutation...
    assert set(seen[1000:]) == set(seen[:1000]) and seen[1000:] != seen[:1000]  # ...reshuffled.
  assert not set(epochs[0][0]) & set(epochs[1][0])
  assert set(epochs[0][0]) | set(epochs[1][0]) == set(split_digests(shapes_dir, "train"))


def test_seed_changes_the_order(shapes_dir):
  a = next(train(shapes_dir, seed=1))["image"]
  b = next(train(shapes_dir, seed=2))["image"]
  assert list(a) != list(b)


def test_resume_equals_skipping_batches_across_epoch_boundaries(shapes_dir):
  # Slice of 500 examples, batches of 32: batch 15 straddles the first epoch boundary.
  kwargs = dict(pp=AUGMENT, local_batch_size=32, seed=7, process_index=1, process_count=4)
  reference = list(itertools.islice(train(shapes_dir, **kwargs), 20))
  for k in (4, 15, 16):
    resumed = train(shapes_dir, start_example=k * 32, **kwargs)
    for expected, got in zip(reference[k:], itertools.islice(resumed, 20 - k)):
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"k={k} {key}")


def test_eval_iterator_covers_each_example_once_with_mask(shapes_dir):
  pp = "decode|value_range(0, 1)|tokenize(8)|keep('image', 'text', 'label')"
  batches = list(pipeline.eval_iterator(name=SMALL, split="val", data_dir=shapes_dir, pp=pp,
                                        tokenizer=ByteTokenizer(), batch_size=64))
  assert [b["_mask"].sum() for b in batches] == [64, 64, 64, 8]
  assert all(b["image"].shape == (64, 64, 64, 3) for b in batches)
  last = batches[-1]
  assert not last["_mask"][8:].any() and not last["image"][8:].any()
  assert not last["text"][8:].any() and not last["label"][8:].any()

  raw = list(pipeline.eval_iterator(name=SMALL, split="val", data_dir=shapes_dir, pp=RAW,
                                    tokenizer=None, batch_size=64))
  got = [digest(x) for b in raw for x, m in zip(b["image"], b["_mask"]) if m]
  assert got == split_digests(shapes_dir, "val")  # File order, each example once.


def test_eval_processes_split_the_data_in_lock_step(shapes_dir):
  seen, counts = [], []
  for process in range(3):
    batches = list(pipeline.eval_iterator(
        name=SMALL, split="val", data_dir=shapes_dir, pp=RAW, tokenizer=None, batch_size=32,
        process_index=process, process_count=3))
    counts.append(len(batches))
    seen += [digest(x) for b in batches for x, m in zip(b["image"], b["_mask"]) if m]
  assert counts == [3, 3, 3]  # 67, 67 and 66 examples: same number of batches everywhere.
  assert sorted(seen) == sorted(split_digests(shapes_dir, "val"))


def test_dataset_queries(shapes_dir):
  assert pipeline.num_examples(SMALL, "test", shapes_dir) == 480
  assert pipeline.num_examples(SMALL, "train[:10%]", shapes_dir) == 200
  assert pipeline.class_names(SMALL, shapes_dir)[:2] == ["red circle", "red square"]
  texts = list(pipeline.iterate_texts(SMALL, "val", shapes_dir, limit=5))
  assert len(texts) == 5 and all(isinstance(t, str) and t for t in texts)
  assert pipeline.available_datasets(shapes_dir) == [SMALL]


@pytest.mark.parametrize("call, words", [
    (lambda d: pipeline.get_builder("coco_captions", d),
     ["config.data.name='coco_captions'", SMALL]),
    (lambda d: pipeline.get_builder("big_vlp_shapes/huge", d), ["big_vlp_shapes/small"]),
    (lambda d: pipeline.num_examples(SMALL, "validation", d),
     ["config.data.split='validation'", "test, train, val"]),
    (lambda d: pipeline.class_names(SMALL, d, key="caption"), ["ClassLabel", "label"]),
    (lambda d: train(d, pp="decode|resise(8)"), ["config.data.pp=", "resize"]),
    (lambda d: pipeline.eval_iterator(name=SMALL, split="tset", data_dir=d, pp=RAW,
                                      tokenizer=None, batch_size=8, config_prefix="evals.z"),
     ["config.evals.z.split='tset'", "test, train, val"]),
])
def test_errors_list_what_exists(shapes_dir, call, words):
  with pytest.raises(ConfigError) as e:
    call(shapes_dir)
  for word in words:
    assert word in str(e.value)
