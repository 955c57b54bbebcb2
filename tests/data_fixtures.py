"""Fixtures shared by the data tests: the `small` shapes dataset, built once per session,
a `fail_on_label` pp op that makes chosen examples fail like undecodable images do, and a
`nan_on_label` op that injects NaN images."""

import pytest
import tensorflow as tf

from big_vlp.data import ops, shapes

SMALL = "big_vlp_shapes/small"
_BUILT: dict[str, str] = {}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
  """A tfds data_dir holding big_vlp_shapes/small (train 2000 / val 200 / test 480)."""
  # Several test modules import this fixture; the cache makes them share one build.
  if "dir" not in _BUILT:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    shapes.ensure_built(data_dir, "small")
    _BUILT["dir"] = data_dir
  return _BUILT["dir"]


@ops.register("nan_on_label")
def nan_on_label(*labels):
  """Test op: turns the image of examples with these labels into NaNs (a numerical fault)."""
  def fn(example):
    bad = tf.reduce_any(tf.equal(tf.cast(example["label"], tf.int64), list(labels)))
    image = tf.cast(example["image"], tf.float32)
    return {**example, "image": tf.where(bad, tf.fill(tf.shape(image), float("nan")), image)}
  return fn


@ops.register("fail_on_label")
def fail_on_label(*labels):
  """Test op: raises (as decoding a corrupt image would) on examples with these labels."""
  def fn(example):
    ok = tf.reduce_all(tf.not_equal(tf.cast(example["label"], tf.int64), list(labels)))
    with tf.control_dependencies([tf.debugging.Assert(ok, ["bad example"])]):
      return {**example, "label": tf.identity(example["label"])}
  return fn
