"""Pre-processing ops against NumPy expectations, seeding, parsing and error messages."""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from big_vlp.config_errors import ConfigError
from big_vlp.data import ops
from big_vlp.data.tokenizers import ByteTokenizer

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)


def run(spec: str, seed=(0, 0), tokenizer=None, **features) -> dict:
  """Applies `spec` inside tf.data (graph mode, as in training) and returns numpy values."""
  example = {k: tf.constant(v) for k, v in features.items()}
  if seed is not None:
    example[ops.SEED_KEY] = tf.constant(seed, tf.int64)
  fn = ops.get_preprocess_fn(spec, tokenizer)
  ds = tf.data.Dataset.from_tensors(example).map(fn)
  return next(iter(ds.as_numpy_iterator()))


def png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


# ----------------------------------------------------------------------------- parsing


def test_parse_spec_reads_literals_without_eval():
  parsed = ops.parse_spec("decode | resize([4, 6]) |value_range(-1, 1)|copy('a|b', dst='c')")
  assert parsed == [("decode", (), {}), ("resize", ([4, 6],), {}),
                    ("value_range", (-1, 1), {}), ("copy", ("a|b",), {"dst": "c"})]
  assert ops.parse_spec("  ") == []


@pytest.mark.parametrize("spec, words", [
    ("decode|rezise(64)", ["unknown op 'rezise'", "registered ops:", "resize", "decode"]),
    ("resize(size=__import__('os'))", ["'resize'", "Python literals"]),
    ("resize(1, 2, 3, 4)", ["bad arguments for op 'resize'(size, key='image', method="]),
    ("resize('big')", ["'resize'", "size must be"]),
    ("resize(8, method='fancy')", ["'resize'", "'bilinear'", "'nearest'"]),
    ("value_range(0, 1, in_min=3, in_max=3)", ["'value_range'"]),
    ("decode|", ["not a valid op pipeline"]),
    ("decode|3", ["is not an op"]),
    ("tokenize(16)", ["'tokenize' needs a tokenizer"]),
])
def test_bad_specs_raise_config_errors_naming_the_problem(spec, words):
  with pytest.raises(ConfigError) as e:
    ops.get_preprocess_fn(spec, field="input.pp")
  assert "config.input.pp=" in str(e.value)
  for word in words:
    assert word in str(e.value)


# ----------------------------------------------------------------------------- image ops


def test_decode_png_and_pass_through_decoded():
  np.testing.assert_array_equal(run("decode", image=png(IMAGE))["image"], IMAGE)
  np.testing.assert_array_equal(run("decode", image=IMAGE)["image"], IMAGE)
  grey = run("decode(channels=1)", image=png(IMAGE))["image"]
  assert grey.shape == (6, 8, 1)


def test_resize_nearest_upsample_equals_repeat():
  out = run("resize([12, 16], method='nearest')", image=IMAGE)["image"]
  np.testing.assert_array_equal(out, IMAGE.repeat(2, axis=0).repeat(2, axis=1))


def test_resize_bilinear_keeps_dtype_shape_and_constant_images():
  out = run("resize(5)", image=IMAGE)["image"]
  assert out.shape == (5, 5, 3) and out.dtype == np.uint8
  flat = np.full((6, 8, 3), 77, np.uint8)
  np.testing.assert_array_equal(run("resize([3, 9])", image=flat)["image"],
                                np.full((3, 9, 3), 77, np.uint8))
  # Bilinear 2x downsampling with half-pixel centres averages 2x2 blocks.
  ramp = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
  out = run("resize(2)", image=ramp)["image"][..., 0]
  np.testing.assert_allclose(out, ramp[..., 0].reshape(2, 2, 2, 2).mean(axis=(1, 3)))


def test_resize_small_keeps_aspect_ratio():
  image = np.zeros((40, 80, 3), np.uint8)
  assert run("resize_small(32)", image=image)["image"].shape == (32, 64, 3)
  assert run("resize_small(20)", image=image.transpose(1, 0, 2))["image"].shape == (40, 20, 3)


def test_central_crop_takes_the_middle():
  np.testing.assert_array_equal(run("central_crop(4)", image=IMAGE)["image"], IMAGE[1:5, 2:6])
  np.testing.assert_array_equal(run("central_crop([2, 8])", image=IMAGE)["image"],
                                IMAGE[2:4, :])


def _is_window_of(crop: np.ndarray, image: np.ndarray) -> bool:
  h, w = crop.shape[:2]
  return any(np.array_equal(image[y:y + h, x:x + w], crop)
             for y in range(image.shape[0] - h + 1) for x in range(image.shape[1] - w + 1))


def test_random_crop_is_a_window_fixed_by_the_seed():
  crops = [run("random_crop([3, 4])", seed=(0, s), image=IMAGE)["image"] for s in range(12)]
  assert all(c.shape == (3, 4, 3) and _is_window_of(c, IMAGE) for c in crops)
  np.testing.assert_array_equal(
      crops[5], run("random_crop([3, 4])", seed=(0, 5), image=IMAGE)["image"])
  assert len({c.tobytes() for c in crops}) > 3


def test_inception_crop_size_and_determinism():
  image = RNG.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
  outs = [run("inception_crop(16)", seed=(1, s), image=image)["image"] for s in range(8)]
  assert all(o.shape == (16, 16, 3) and o.dtype == np.uint8 for o in outs)
  np.testing.assert_array_equal(outs[2], run("inception_crop(16)", seed=(1, 2),
                                             image=image)["image"])
  assert len({o.tobytes() for o in outs}) > 4
  # A crop of 100% of the area with no resize is the whole image.
  full = run("inception_crop(area_min=100, area_max=100)", seed=(1, 0), image=image)["image"]
  np.testing.assert_array_equal(full, image)
  crop = run("inception_crop(area_min=10, area_max=30)", seed=(1, 3), image=image)["image"]
  assert 0.1 <= crop.shape[0] * crop.shape[1] / 32**2 <= 0.3 and _is_window_of(crop, image)


def test_flip_lr_flips_half_the_time_deterministically():
  outs = [run("flip_lr", seed=(2, s), image=IMAGE)["image"] for s in range(32)]
  flipped = [np.array_equal(o, np.fliplr(IMAGE)) for o in outs]
  assert all(f or np.array_equal(o, IMAGE) for f, o in zip(flipped, outs))
  assert 4 <= sum(flipped) <= 28
  again = run("flip_lr", seed=(2, 7), image=IMAGE)["image"]
  np.testing.assert_array_equal(again, outs[7])


def test_random_ops_without_seed_fail_clearly():
  with pytest.raises(Exception, match="_seed"):
    run("flip_lr", seed=None, image=IMAGE)


def test_value_range_maps_linearly_to_float32():
  image = np.array([[[0, 255, 51]]], np.uint8)
  out = run("value_range(-1, 1)", image=image)["image"]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[[-1.0, 1.0, 51 / 255 * 2 - 1]]], rtol=1e-6)
  out = run("value_range(0, 1, in_min=50, in_max=100, clip_values=True)", image=image)["image"]
  np.testing.assert_allclose(out, [[[0.0, 1.0, 0.02]]], rtol=1e-5)


def test_normalize_per_channel():
  mean, std = [10.0, 20.0, 30.0], [2.0, 4.0, 5.0]
  out = run(f"normalize({mean}, {std})", image=IMAGE)["image"]
  np.testing.assert_allclose(out, (IMAGE.astype(np.float32) - mean) / std, rtol=1e-6)


# ----------------------------------------------------------------------------- text and dict ops


def test_tokenize_bytes_lowercased_truncated_with_eos():
  out = run("tokenize(max_len=6, key='caption', out_key='text')", tokenizer=ByteTokenizer(),
            caption="Hi Box!")
  np.testing.assert_array_equal(out["text"], [ord(c) + 2 for c in "hi bo"] + [1])
  out = run("tokenize(5, lower=False)", tokenizer=ByteTokenizer(), caption="Ab")
  np.testing.assert_array_equal(out["text"], [ord("A") + 2, ord("b") + 2, 1, 0, 0])
  multi = run("tokenize(4)", tokenizer=ByteTokenizer(), caption=["a", "bc"])["text"]
  np.testing.assert_array_equal(multi, [[99, 1, 0, 0], [100, 101, 1, 0]])


def test_keep_drop_copy_and_seed_survival():
  out = run("copy('a', 'c')|keep('a', 'c')", seed=(4, 5), a=1, b=2)
  assert set(out) == {"a", "c", ops.SEED_KEY} and out["c"] == 1
  np.testing.assert_array_equal(out[ops.SEED_KEY], [4, 5])  # Restored after every op.
  out = run("drop('a', '_seed')", seed=(4, 5), a=1, b=2)
  assert set(out) == {"b", ops.SEED_KEY}


def test_each_op_position_gets_its_own_seed():
  same = 0
  for s in range(24):
    out = run("flip_lr(key='a')|flip_lr(key='b')", seed=(3, s), a=IMAGE, b=IMAGE)
    same += np.array_equal(out["a"], out["b"])
  assert same < 22  # With one shared seed both flips would always agree.


def test_register_custom_op():
  @ops.register("test_double")
  def double(key: str = "x"):
    return lambda ex: {**ex, key: ex[key] * 2}
  assert run("test_double|test_double(key='x')", x=3)["x"] == 12
  with pytest.raises(ValueError, match="already registered"):
    ops.register("test_double")(double)
