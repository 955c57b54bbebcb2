"""Pre-processing ops against NumPy expectations, seeding, parsing and error messages."""

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
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


def run_seeds(spec: str, seeds, **features) -> list[dict]:
  """`run` for each seed in `seeds`, tracing the pipeline once (randaug is slow to trace)."""
  fn = ops.get_preprocess_fn(spec)
  constants = {k: tf.constant(v) for k, v in features.items()}
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64))
  ds = ds.map(lambda seed: fn({**constants, ops.SEED_KEY: seed}))
  return list(ds.as_numpy_iterator())


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
    ("randaug(2, -1)", ["'randaug'", "magnitude", "[0, 30]"]),
    ("randaug(magnitude=31)", ["'randaug'", "magnitude", "[0, 30]"]),
    ("randaug(2, 'high')", ["'randaug'", "magnitude", "[0, 30]"]),
    ("randaug(num_layers=-1)", ["'randaug'", "num_layers", ">= 0"]),
    ("randaug(1.5)", ["'randaug'", "num_layers", ">= 0"]),
    ("randaug(2, 10, cutout_const=-4)", ["'randaug'", "cutout_const"]),
    ("resize_long([4, 6])", ["'resize_long'", "positive int"]),
    ("normalize(0, [1, 0, 1])", ["'normalize'", "non-zero"]),
    ("choice(key=3)", ["'choice'", "strings"]),
])
def test_bad_specs_raise_config_errors_naming_the_problem(spec, words):
  with pytest.raises(ConfigError) as e:
    ops.get_preprocess_fn(spec, field="input.pp")
  assert "config.input.pp=" in str(e.value)
  for word in words:
    assert word in str(e.value)


# ----------------------------------------------------------------------------- image ops


def test_decode_jpeg_matches_pil_and_grey_png_becomes_rgb():
  rows, cols = np.meshgrid(np.arange(16) * 16, np.arange(16) * 8, indexing="ij")
  smooth = np.stack([rows, cols, np.full((16, 16), 90)], axis=-1).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(smooth).save(buf, format="JPEG", quality=90, subsampling=0)  # 4:4:4.
  out = run("decode", image=buf.getvalue())["image"]
  expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
  assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
  # tf.io.decode_image uses libjpeg's fast integer IDCT, PIL the accurate one: off by <= 3.
  error = np.abs(out.astype(int) - expected)
  assert error.max() <= 4 and error.mean() < 1.5
  grey_image = IMAGE[..., 0]
  out = run("decode", image=png(grey_image))["image"]
  np.testing.assert_array_equal(out, np.repeat(grey_image[..., None], 3, axis=-1))


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
  # Non-integer scales round the longer side: 5x7 -> 3 x round(4.2); 5x7 -> 8 x round(11.2).
  assert run("resize_small(3)", image=RNG.integers(0, 256, (5, 7, 3), np.uint8))[
      "image"].shape == (3, 4, 3)
  assert run("resize_small(8)", image=np.zeros((7, 5, 1), np.uint8))["image"].shape == (11, 8, 1)
  # Already the right size: the pixels come back unchanged.
  np.testing.assert_array_equal(run("resize_small(6)", image=IMAGE)["image"], IMAGE)


def test_resize_long_keeps_aspect_ratio():
  image = np.zeros((40, 80, 3), np.uint8)
  assert run("resize_long(20)", image=image)["image"].shape == (10, 20, 3)
  assert run("resize_long(20)", image=image.transpose(1, 0, 2))["image"].shape == (20, 10, 3)
  assert run("resize_long(3)", image=np.zeros((5, 7, 3), np.uint8))["image"].shape == (2, 3, 3)
  assert run("resize_long(3)", image=np.zeros((1, 30, 3), np.uint8))["image"].shape == (1, 3, 3)
  np.testing.assert_array_equal(run("resize_long(8)", image=IMAGE)["image"], IMAGE)
  out = run("resize_long(16, method='nearest')", image=IMAGE)["image"]
  np.testing.assert_array_equal(out, IMAGE.repeat(2, axis=0).repeat(2, axis=1))


def test_central_crop_takes_the_middle():
  np.testing.assert_array_equal(run("central_crop(4)", image=IMAGE)["image"], IMAGE[1:5, 2:6])
  np.testing.assert_array_equal(run("central_crop([2, 8])", image=IMAGE)["image"],
                                IMAGE[2:4, :])
  # Odd margins: the extra row/column is left at the bottom/right.
  ramp = np.arange(6 * 8).reshape(6, 8, 1).astype(np.int32)
  np.testing.assert_array_equal(run("central_crop(3)", image=ramp)["image"][..., 0],
                                [[10, 11, 12], [18, 19, 20], [26, 27, 28]])


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
  out = run("normalize(127.5, 127.5)", image=IMAGE)["image"]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, IMAGE / 127.5 - 1, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- RandAugment

# A larger image (so that Equalize's histogram step is non-zero) with a narrow value range
# in channel 0, a skewed one in channel 1 and a constant channel 2.
BIG = np.stack([RNG.integers(40, 181, (24, 20)),
                (RNG.random((24, 20)) ** 3 * 255).astype(int),
                np.full((24, 20), 77)], axis=-1).astype(np.uint8)
IDENTITY_AT_MAGNITUDE_0 = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout",
                           "SolarizeAdd")


def pil_op(fn, image: np.ndarray, *args) -> np.ndarray:
  return np.asarray(fn(Image.fromarray(image), *args))


def tf_op(fn, image: np.ndarray, *args) -> np.ndarray:
  return fn(tf.constant(image), *args).numpy()


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """out[y, x] = image[y + dy, x + dx], GREY where that is outside the image."""
  h, w = image.shape[:2]
  out = np.full_like(image, ops.GREY)
  for y in range(h):
    for x in range(w):
      if 0 <= y + dy < h and 0 <= x + dx < w:
        out[y, x] = image[y + dy, x + dx]
  return out


@pytest.mark.parametrize("image", [IMAGE, BIG], ids=["small", "big"])
def test_pixel_ops_match_pil(image):
  np.testing.assert_array_equal(tf_op(ops.invert, image), pil_op(ImageOps.invert, image))
  np.testing.assert_array_equal(tf_op(ops.autocontrast, image),
                                pil_op(ImageOps.autocontrast, image))
  np.testing.assert_array_equal(tf_op(ops.equalize, image), pil_op(ImageOps.equalize, image))
  for bits in range(1, 9):
    np.testing.assert_array_equal(tf_op(ops.posterize, image, bits),
                                  pil_op(ImageOps.posterize, image, bits))
  np.testing.assert_array_equal(tf_op(ops.posterize, image, 0), np.zeros_like(image))
  for threshold in (0, 1, 100, 128, 255, 256, 300):
    np.testing.assert_array_equal(tf_op(ops.solarize, image, threshold),
                                  pil_op(ImageOps.solarize, image, threshold))


def test_equalize_and_autocontrast_change_the_test_image():
  # Guards the PIL comparisons above against comparing two identities.
  assert not np.array_equal(tf_op(ops.equalize, BIG), BIG)
  out = tf_op(ops.autocontrast, BIG)
  assert out[..., 0].min() == 0 and out[..., 0].max() >= 254  # PIL's float rounding: 254.
  np.testing.assert_array_equal(out[..., 2], BIG[..., 2])  # A constant channel is kept.


def test_solarize_add_adds_below_threshold_with_clipping():
  image = np.array([[[0, 100, 127], [128, 200, 255]]], np.uint8)
  np.testing.assert_array_equal(tf_op(ops.solarize_add, image, 110),
                                [[[110, 210, 237], [128, 200, 255]]])
  np.testing.assert_array_equal(tf_op(ops.solarize_add, image, 200),
                                [[[200, 255, 255], [128, 200, 255]]])
  np.testing.assert_array_equal(tf_op(ops.solarize_add, image, 0), image)
  np.testing.assert_array_equal(tf_op(ops.solarize_add, image, -50),
                                [[[0, 50, 77], [128, 200, 255]]])
  np.testing.assert_array_equal(tf_op(ops.solarize_add, image, 110, 256),
                                [[[110, 210, 237], [238, 255, 255]]])
  np.testing.assert_array_equal(tf_op(ops.solarize_add, image, 110, 0), image)


@pytest.mark.parametrize("name, pil_enhance", [
    ("color", ImageEnhance.Color), ("contrast", ImageEnhance.Contrast),
    ("brightness", ImageEnhance.Brightness), ("sharpness", ImageEnhance.Sharpness)])
def test_enhance_ops_match_pil(name, pil_enhance):
  for image in (IMAGE, BIG):
    for factor in (0.0, 0.1, 0.5, 1.0, 1.37, 1.9):
      expected = np.asarray(pil_enhance(Image.fromarray(image)).enhance(factor))
      np.testing.assert_array_equal(tf_op(getattr(ops, name), image, factor), expected,
                                    err_msg=f"{name}({factor})")


def test_grey_and_blend_formulas():
  np.testing.assert_array_equal(tf_op(ops.grey, BIG), pil_op(lambda im: im.convert("L"), BIG))
  a = np.array([[[10, 200, 0]]], np.uint8)
  b = np.array([[[20, 100, 255]]], np.uint8)
  blend = lambda f: ops.blend(tf.constant(a), tf.constant(b), f).numpy()
  np.testing.assert_array_equal(blend(0.0), a)
  np.testing.assert_array_equal(blend(1.0), b)
  np.testing.assert_array_equal(blend(0.55), [[[15, 145, 140]]])  # Truncated: 145.0, 140.25.
  np.testing.assert_array_equal(blend(1.5), [[[25, 50, 255]]])  # Clipped: 382.5.


def test_translate_by_integers_shifts_and_fills_grey():
  for pixels in (-9, -2, 0, 1, 3):
    np.testing.assert_array_equal(tf_op(ops.translate_x, IMAGE, pixels),
                                  shifted(IMAGE, 0, pixels))
    np.testing.assert_array_equal(tf_op(ops.translate_y, IMAGE, pixels),
                                  shifted(IMAGE, pixels, 0))


def test_shear_samples_the_sheared_position():
  image = IMAGE[:5]  # level * y stays clear of .5, so rounding is unambiguous.
  for level in (0.3, -0.3, 0.7):
    expected = np.full_like(image, ops.GREY)
    for y in range(5):
      for x in range(8):
        source = int(np.floor(x + level * y + 0.5))
        if 0 <= source < 8:
          expected[y, x] = image[y, source]
    np.testing.assert_array_equal(tf_op(ops.shear_x, image, level), expected)
    np.testing.assert_array_equal(tf_op(ops.shear_y, image.transpose(1, 0, 2), level),
                                  expected.transpose(1, 0, 2))


def test_rotate_quarter_turns_and_fill():
  square = BIG[:7, :7]
  np.testing.assert_array_equal(tf_op(ops.rotate, square, 0.0), square)
  np.testing.assert_array_equal(tf_op(ops.rotate, square, 90.0), np.rot90(square))
  np.testing.assert_array_equal(tf_op(ops.rotate, square, -90.0), np.rot90(square, -1))
  np.testing.assert_array_equal(tf_op(ops.rotate, square, 180.0), square[::-1, ::-1])
  # A 90 degree turn of a 6x8 image: the 8x6 result is centred, cropped at the top and bottom,
  # with grey bands left and right.
  out = tf_op(ops.rotate, IMAGE, 90.0)
  np.testing.assert_array_equal(out[:, 1:7], np.rot90(IMAGE)[1:7])
  np.testing.assert_array_equal(out[:, [0, 7]], np.full((6, 2, 3), ops.GREY))
  # The centre pixel of an odd square stays put under any rotation.
  for degrees in (13.0, -30.0):
    np.testing.assert_array_equal(tf_op(ops.rotate, square, degrees)[3, 3], square[3, 3])


def test_cutout_greys_exactly_the_clipped_square():
  out = ops.cutout_at(tf.constant(IMAGE), 2, 5, 2).numpy()
  expected = IMAGE.copy()
  expected[0:4, 3:7] = ops.GREY
  np.testing.assert_array_equal(out, expected)
  out = ops.cutout_at(tf.constant(IMAGE), 0, 7, 3).numpy()  # Clipped by the corner.
  expected = IMAGE.copy()
  expected[0:3, 4:8] = ops.GREY
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(ops.cutout_at(tf.constant(IMAGE), 3, 3, 0).numpy(), IMAGE)
  # The seeded version puts the square at its drawn centre; centres vary with the seed.
  centres = set()
  for s in range(12):
    seed = tf.constant([5, s], tf.int64)
    y, x = (int(v) for v in ops.cutout_center(tf.constant(BIG), seed))
    assert 0 <= y < 24 and 0 <= x < 20
    centres.add((y, x))
    np.testing.assert_array_equal(ops.cutout(tf.constant(BIG), 3, seed).numpy(),
                                  ops.cutout_at(tf.constant(BIG), y, x, 3).numpy())
  assert len(centres) > 6


def test_randaug_branches_magnitude_mapping():
  image = tf.constant(BIG)
  seed = tf.constant([0, 0], tf.int64)
  at = lambda magnitude, name, sign=1.0, **kw: ops.randaug_branches(magnitude, **kw)[name](
      image, tf.constant(sign), seed).numpy()
  assert set(ops.randaug_branches(10)) == set(ops.RANDAUG_OPS) and len(ops.RANDAUG_OPS) == 16
  for name in IDENTITY_AT_MAGNITUDE_0:
    for sign in (1.0, -1.0):
      np.testing.assert_array_equal(at(0, name, sign), BIG, err_msg=name)
  for name in ("Color", "Contrast", "Brightness", "Sharpness"):  # Factor 0.1 + 1.8 * 0.5 = 1.
    np.testing.assert_array_equal(at(5, name), BIG, err_msg=name)
  np.testing.assert_array_equal(at(10, "Brightness"), tf_op(ops.brightness, BIG, 1.9))
  np.testing.assert_array_equal(at(0, "Contrast"), tf_op(ops.contrast, BIG, 0.1))
  np.testing.assert_array_equal(at(10, "Posterize"), BIG & 0xF0)  # 4 bits.
  np.testing.assert_array_equal(at(30, "Posterize"), BIG)  # 12 bits, clipped to 8.
  np.testing.assert_array_equal(at(10, "Solarize"), BIG)  # Threshold 256.
  np.testing.assert_array_equal(at(5, "Solarize"), tf_op(ops.solarize, BIG, 128))
  np.testing.assert_array_equal(at(10, "SolarizeAdd"), tf_op(ops.solarize_add, BIG, 110))
  np.testing.assert_array_equal(at(10, "Rotate", -1.0), tf_op(ops.rotate, BIG, -30.0))
  np.testing.assert_array_equal(at(30, "Rotate"), tf_op(ops.rotate, BIG, 90.0))
  np.testing.assert_array_equal(at(10, "ShearY", -1.0), tf_op(ops.shear_y, BIG, -0.3))
  np.testing.assert_array_equal(at(10, "TranslateX", -1.0), shifted(BIG, 0, -100))
  np.testing.assert_array_equal(at(5, "TranslateY", translate_const=4), shifted(BIG, 2, 0))
  cut = at(10, "Cutout", cutout_const=2)  # A 4x4 grey square somewhere.
  y, x = (int(v) for v in ops.cutout_center(image, seed))
  np.testing.assert_array_equal(cut, ops.cutout_at(image, y, x, 2).numpy())


def test_randaug_sub_ops_in_graph_mode_with_unknown_shape():
  branches = ops.randaug_branches(7)
  spec = [tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.float32),
          tf.TensorSpec([2], tf.int64)]
  args = (tf.constant(BIG), tf.constant(-1.0), tf.constant([1, 2], tf.int64))
  for name in ops.RANDAUG_OPS:
    graph_fn = tf.function(branches[name], input_signature=spec)
    out = graph_fn(*args)
    assert out.dtype == tf.uint8 and out.shape == BIG.shape
    np.testing.assert_array_equal(out, branches[name](*args), err_msg=name)


def test_randaug_draws_cover_all_ops_and_both_signs():
  counts = np.zeros(16, int)
  signs = set()
  for s in range(320):
    index, sign, _ = ops.randaug_draws(tf.constant([7, s], tf.int64), s % 3)
    counts[int(index)] += 1
    signs.add(float(sign))
  assert counts.min() >= 6 and counts.max() <= 40, counts  # Expected 20 each.
  assert signs == {-1.0, 1.0}
  # Layers draw independently.
  first = [int(ops.randaug_draws(tf.constant([1, s], tf.int64), 0)[0]) for s in range(16)]
  second = [int(ops.randaug_draws(tf.constant([1, s], tf.int64), 1)[0]) for s in range(16)]
  assert first != second


def manual_randaug(image: np.ndarray, seed, num_layers: int, magnitude: float,
                   **consts) -> np.ndarray:
  """The composed op rebuilt from its draws (position 0 of a pipeline folds in 0)."""
  seed = tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64), 0)
  branches = ops.randaug_branches(magnitude, **consts)
  out = tf.constant(image)
  for layer in range(num_layers):
    index, sign, cutout_seed = ops.randaug_draws(seed, layer)
    out = branches[ops.RANDAUG_OPS[int(index)]](out, sign, cutout_seed)
  return out.numpy()


def test_randaug_composes_the_drawn_ops_deterministically():
  image = RNG.integers(0, 256, (32, 24, 3), np.uint8)
  spec = "randaug(2, 9, translate_const=10)"  # 100 px would shift everything out.
  outs = [ex["image"] for ex in run_seeds(spec, [(3, s) for s in range(10)], image=image)]
  for s, out in enumerate(outs):
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, manual_randaug(image, (3, s), 2, 9, translate_const=10))
  np.testing.assert_array_equal(outs[4], run(spec, seed=(3, 4), image=image)["image"])
  assert len({o.tobytes() for o in outs}) >= 9
  np.testing.assert_array_equal(run("randaug(0)", image=image)["image"], image)


def test_randaug_magnitude_0_identity_ops_leave_the_image():
  identities = 0
  outs = run_seeds("randaug(1, 0)", [(9, s) for s in range(24)], image=BIG)
  for s, out in enumerate(ex["image"] for ex in outs):
    seed = tf.random.experimental.stateless_fold_in(tf.constant([9, s], tf.int64), 0)
    name = ops.RANDAUG_OPS[int(ops.randaug_draws(seed, 0)[0])]
    if name in IDENTITY_AT_MAGNITUDE_0:
      identities += 1
      np.testing.assert_array_equal(out, BIG, err_msg=name)
  assert identities > 0


def test_randaug_in_a_pipeline_on_unknown_sizes():
  spec = "decode|inception_crop(16)|flip_lr|randaug(2, 10)|value_range(-1, 1)"
  image = RNG.integers(0, 256, (40, 30, 3), np.uint8)
  outs = [ex["image"] for ex in run_seeds(spec, [(0, s) for s in range(6)], image=png(image))]
  assert all(o.shape == (16, 16, 3) and o.dtype == np.float32 for o in outs)
  assert len({o.tobytes() for o in outs}) == 6
  # decode leaves the height and width unknown; randaug keeps whatever is known.
  fn = ops.get_preprocess_fn("decode|randaug(3, 12)")
  ds = tf.data.Dataset.from_tensors({"image": png(image), ops.SEED_KEY: tf.constant([1, 2],
                                                                                   tf.int64)})
  ds = ds.map(fn)
  assert ds.element_spec["image"].shape.as_list() == [None, None, 3]
  assert next(iter(ds))["image"].shape == (40, 30, 3)


def test_randaug_rejects_float_and_grey_images():
  with pytest.raises(ValueError, match="uint8"):
    run("value_range(0, 1)|randaug", image=IMAGE)
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    run("randaug", image=IMAGE[..., :1])
  with pytest.raises(ValueError, match="_seed"):
    run("randaug", seed=None, image=IMAGE)


# ----------------------------------------------------------------------------- text and dict ops


def test_tokenize_bytes_lowercased_truncated_with_eos():
  out = run("tokenize(max_len=6, key='caption', out_key='text')", tokenizer=ByteTokenizer(),
            caption="Hi Box!")
  np.testing.assert_array_equal(out["text"], [ord(c) + 2 for c in "hi bo"] + [1])
  out = run("tokenize(5, lower=False)", tokenizer=ByteTokenizer(), caption="Ab")
  np.testing.assert_array_equal(out["text"], [ord("A") + 2, ord("b") + 2, 1, 0, 0])
  multi = run("tokenize(4)", tokenizer=ByteTokenizer(), caption=["a", "bc"])["text"]
  np.testing.assert_array_equal(multi, [[99, 1, 0, 0], [100, 101, 1, 0]])


def test_lower_is_utf8_aware_for_scalars_and_vectors():
  out = run("lower", caption="ÄÖÜ École ΣΟΦΙΑ Big-Box 42")
  assert out["caption"].decode() == "äöü école σοφια big-box 42"
  out = run("lower(key='captions')", captions=["A Dog", "ÉTÉ", ""])
  assert [c.decode() for c in out["captions"]] == ["a dog", "été", ""]


def test_choice_picks_each_caption_deterministically():
  captions = ["a", "b", "c", "d"]
  picks = [ex["caption"] for ex in run_seeds("choice", [(6, s) for s in range(40)],
                                              caption=captions)]
  assert set(picks) == {b"a", b"b", b"c", b"d"}
  assert run("choice", seed=(6, 11), caption=captions)["caption"] == picks[11]
  out = run("choice(out_key='text')", seed=(6, 11), caption=captions)
  assert out["text"] == picks[11] and list(out["caption"]) == [c.encode() for c in captions]
  assert isinstance(out["text"], bytes)  # A scalar.
  # Numbers too, and a single-entry vector.
  assert run("choice('ids')", ids=[7])["ids"] == 7
  outs = run_seeds("choice('ids')", [(0, s) for s in range(30)], ids=[1, 2, 3])
  assert {int(ex["ids"]) for ex in outs} == {1, 2, 3}


def test_choice_scalar_passes_through_and_empty_fails():
  assert run("choice", caption="only one")["caption"] == b"only one"
  assert run("choice", seed=None, caption="only one")["caption"] == b"only one"
  with pytest.raises(tf.errors.InvalidArgumentError):
    run("choice", caption=tf.constant([], tf.string))
  with pytest.raises(ValueError, match="scalar or a vector"):
    run("choice", caption=[["a", "b"]])


def test_choice_with_unknown_rank():
  fn = ops.get_preprocess_fn("choice")
  pick = tf.function(lambda c: fn({"caption": c, ops.SEED_KEY: tf.constant([0, 1], tf.int64)}),
                     input_signature=[tf.TensorSpec(None, tf.string)])
  assert pick(tf.constant("x"))["caption"] == b"x"
  assert pick(tf.constant(["x", "y"]))["caption"] in (b"x", b"y")
  with pytest.raises(tf.errors.InvalidArgumentError, match="scalar or vector"):
    pick(tf.constant([["x"]]))


def test_new_ops_are_registered():
  assert {"randaug", "choice", "lower", "resize_long"} <= set(ops.registered_ops())


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


# ----------------------------------------------------------------------------- choice(also=)


def test_choice_also_takes_the_row_of_the_chosen_caption():
  captions = ["a", "", "b", "  ", "c"]  # Blank ones are never picked: rows keep their place.
  rows = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
  spec = "choice(key='caption', also=('z', 'ids'))"
  outs = run_seeds(spec, [(6, s) for s in range(40)], caption=captions, z=rows,
                   ids=np.arange(5, dtype=np.int32))
  assert {ex["caption"] for ex in outs} == {b"a", b"b", b"c"}
  for ex in outs:
    index = captions.index(ex["caption"].decode())
    np.testing.assert_array_equal(ex["z"], rows[index])
    assert ex["ids"] == index
  # The same pick as without `also` (same seed scheme), and out_key leaves `key` alone.
  plain = run_seeds("choice(key='caption')", [(6, s) for s in range(40)], caption=captions)
  assert [ex["caption"] for ex in outs] == [ex["caption"] for ex in plain]
  out = run("choice(out_key='text', also='z')", seed=(6, 11), caption=captions, z=rows)
  assert out["text"] == plain[11]["caption"] and out["z"].shape == (3,)
  # A scalar caption is one entry: its row 0.
  out = run("choice(also=('z',))", caption="only one", z=rows[:1])
  np.testing.assert_array_equal(out["z"], rows[0])


def test_choice_also_on_non_text_and_unknown_shapes():
  outs = run_seeds("choice('ids', also=('z',))", [(0, s) for s in range(20)], ids=[4, 5, 6],
                   z=[[40.0], [50.0], [60.0]])
  assert all(ex["z"][0] == 10 * ex["ids"] for ex in outs)
  fn = ops.get_preprocess_fn("choice(also=('z',))")
  pick = tf.function(lambda c, z: fn({"caption": c, "z": z,
                                      ops.SEED_KEY: tf.constant([0, 1], tf.int64)}),
                     input_signature=[tf.TensorSpec(None, tf.string),
                                      tf.TensorSpec([None, 2], tf.float32)])
  out = pick(tf.constant(["x", "y"]), tf.constant([[1.0, 1.0], [2.0, 2.0]]))
  assert float(out["z"][0]) == {b"x": 1.0, b"y": 2.0}[out["caption"].numpy()]
  np.testing.assert_array_equal(pick(tf.constant("x"), tf.constant([[3.0, 4.0]]))["z"], [3, 4])
  with pytest.raises(tf.errors.InvalidArgumentError, match="as many rows"):
    pick(tf.constant(["x", "y"]), tf.constant([[1.0, 1.0]]))


def test_choice_also_rejects_misaligned_keys():
  fn = ops.get_preprocess_fn("choice(also=('z',))")
  seed = tf.constant([0, 1], tf.int64)
  rows = tf.zeros([2, 3])
  # Static shapes that disagree: OpArgError (eagerly, as the input's start-up check runs).
  with pytest.raises(ops.OpArgError, match=r"'z'.*2 rows.*'caption'.*3 entries"):
    fn({"caption": tf.constant(["a", "b", "c"]), "z": rows, ops.SEED_KEY: seed})
  with pytest.raises(ops.OpArgError, match=r"'z'.*2 rows.*1 entries"):
    fn({"caption": tf.constant("scalar"), "z": rows, ops.SEED_KEY: seed})
  with pytest.raises(ops.OpArgError, match="got a scalar"):
    fn({"caption": tf.constant(["a", "b"]), "z": tf.constant(1.0), ops.SEED_KEY: seed})
  # Dataset features have dynamic shapes: the example fails at run time.
  pick = tf.function(lambda c, z: fn({"caption": c, "z": z, ops.SEED_KEY: seed}),
                     input_signature=[tf.TensorSpec([None], tf.string),
                                      tf.TensorSpec([None, 3], tf.float32)])
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"example.*z.*as many rows"):
    pick(tf.constant(["a", "b", "c"]), rows)
  for bad in ("choice(also=('caption',))", "choice(also=3)", "choice(also=('z', 'z'))",
              "choice(out_key='t', also=('t',))"):
    with pytest.raises(ConfigError, match="'choice'"):
      ops.get_preprocess_fn(bad)


# What `choice` picked from ["a", "", "b", "c", "d"] with seeds (6, 0..11) before `also` existed.
RECORDED_CHOICE_PICKS = ["c", "a", "c", "d", "d", "c", "c", "b", "a", "b", "d", "a"]


def test_choice_without_also_is_unchanged():
  captions = ["a", "", "b", "c", "d"]
  picks = [ex["caption"].decode() for ex in run_seeds("choice", [(6, s) for s in range(12)],
                                                       caption=captions)]
  assert picks == RECORDED_CHOICE_PICKS
