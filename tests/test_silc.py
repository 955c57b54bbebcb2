"""SILC pieces against NumPy: EMA teacher, DINO loss / centering / head, multi-crop op."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from big_vlp import ema, losses_silc
from big_vlp.config_errors import ConfigError
from big_vlp.data import ops
from big_vlp.models.dino_head import DinoHead, unit_columns

RNG = np.random.default_rng(0)

# ----------------------------------------------------------------------------- EMA


def test_ema_update_is_the_formula_per_leaf_keeping_dtypes():
  teacher = {"a": RNG.normal(size=(3, 4)).astype(np.float32),
             "b": {"c": RNG.normal(size=(5,)).astype(jnp.bfloat16)}}
  student = jax.tree.map(lambda x: (np.asarray(x, np.float32) + 1).astype(x.dtype), teacher)
  m = np.float32(0.9)
  expected = m * teacher["a"] + (1 - m) * student["a"]
  t, s = (np.asarray(x["b"]["c"], np.float32) for x in (teacher, student))
  expected_bf16 = (m * t + (1 - m) * s).astype(jnp.bfloat16)
  eager = ema.ema_update(teacher, student, 0.9)
  np.testing.assert_array_equal(eager["a"], expected)
  np.testing.assert_array_equal(eager["b"]["c"], expected_bf16)
  # Under jit XLA may fuse the multiply-add (one rounding instead of two): 1 ulp apart.
  jitted = jax.jit(ema.ema_update)(teacher, student, jnp.float32(0.9))
  np.testing.assert_array_max_ulp(jitted["a"], expected, maxulp=1)
  for out in (eager, jitted):
    assert out["a"].dtype == np.float32 and out["b"]["c"].dtype == jnp.bfloat16
  same = ema.ema_update(teacher, student, 1.0)
  np.testing.assert_array_equal(same["a"], teacher["a"])
  with pytest.raises(TypeError, match="floating-point"):
    ema.ema_update({"n": np.zeros(2, np.int32)}, {"n": np.ones(2, np.int32)}, 0.5)
  with pytest.raises(ValueError):
    ema.ema_update(teacher, {"a": student["a"]}, 0.5)


def test_ema_momentum_cosine_schedule():
  steps = np.arange(0, 1201, 50)
  values = np.array([ema.ema_momentum(s, 1000, 0.996, 1.0) for s in steps])
  np.testing.assert_allclose(values[0], 0.996, rtol=1e-7)
  np.testing.assert_allclose(values[steps == 500], 0.998, rtol=1e-7)
  np.testing.assert_allclose(values[steps >= 1000], 1.0, rtol=1e-7)
  assert np.all(np.diff(values) >= 0) and values[1] > values[0]
  np.testing.assert_allclose(ema.ema_momentum(300, 1000, 0.99, 0.99), 0.99, rtol=1e-7)
  np.testing.assert_allclose(jax.jit(ema.ema_momentum, static_argnums=1)(jnp.int32(250), 1000),
                             1.0 - 0.004 * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-6)

# ----------------------------------------------------------------------------- DINO loss


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_dino_loss(s, t, c, ts, tt, has_globals):
  """Loops over (teacher view, student view) pairs, skipping the same global crop."""
  s, t, c = (np.asarray(x, np.float64) for x in (s, t, c))
  total, terms = 0.0, 0
  for i in range(len(t)):
    q = np_softmax((t[i] - c) / tt)
    for v in range(len(s)):
      if has_globals and v == i:
        continue
      total += np.mean(-np.sum(q * np.log(np_softmax(s[v] / ts)), axis=-1))
      terms += 1
  return total / terms


@pytest.mark.parametrize("S, T, has_globals", [(6, 2, True), (2, 2, True), (3, 2, False),
                                              (1, 1, False)])
def test_dino_loss_matches_numpy(S, T, has_globals):
  s, t = RNG.normal(size=(S, 4, 10)) * 3, RNG.normal(size=(T, 4, 10)) * 3
  c = RNG.normal(size=(10,))
  got = losses_silc.dino_loss(jnp.float32(s), jnp.float32(t), jnp.float32(c), 0.1, 0.04,
                              student_has_globals=has_globals)
  np.testing.assert_allclose(got, np_dino_loss(s, t, c, 0.1, 0.04, has_globals), rtol=1e-5)


def test_dino_loss_skips_the_same_global_view():
  s, t = jnp.float32(RNG.normal(size=(2, 3, 8))), jnp.float32(RNG.normal(size=(1, 3, 8)))
  c = jnp.zeros(8)
  base = losses_silc.dino_loss(s, t, c)  # Student view 0 is the teacher's crop: skipped.
  np.testing.assert_allclose(base, losses_silc.dino_loss(s[1:], t, c, student_has_globals=False),
                             rtol=1e-6)
  np.testing.assert_allclose(base, losses_silc.dino_loss(s.at[0].set(9.0), t, c), rtol=1e-6)
  assert losses_silc.dino_loss(s, t, c, student_has_globals=False) != base
  with pytest.raises(ValueError, match="global views"):
    losses_silc.dino_loss(s[:1], jnp.concatenate([t, t]), c)
  with pytest.raises(ValueError, match="no .* pairs"):
    losses_silc.dino_loss(s[:1], t, c)


def test_dino_loss_gradient_reaches_only_the_student():
  s, t = jnp.float32(RNG.normal(size=(4, 3, 8))), jnp.float32(RNG.normal(size=(2, 3, 8)))
  c = jnp.float32(RNG.normal(size=(8,)))
  gs, gt, gc = jax.grad(losses_silc.dino_loss, argnums=(0, 1, 2))(s, t, c)
  assert np.abs(gs).max() > 1e-3
  np.testing.assert_array_equal(gt, 0.0)
  np.testing.assert_array_equal(gc, 0.0)


def test_dino_loss_is_smallest_when_the_student_matches_the_sharpened_teacher():
  t, c = RNG.normal(size=(1, 5, 12)), RNG.normal(size=(12,))
  ts, tt = 0.1, 0.04
  # Student logits giving softmax(s / ts) == softmax((t - c) / tt), up to a per-row shift.
  match = ts * (t - c) / tt + RNG.normal(size=(1, 5, 1))
  loss = lambda s: losses_silc.dino_loss(jnp.float32(s), jnp.float32(t), jnp.float32(c), ts, tt,
                                         student_has_globals=False)
  q = np_softmax((t[0] - c) / tt)
  entropy = np.mean(-np.sum(q * np.log(q), axis=-1))
  np.testing.assert_allclose(loss(match), entropy, rtol=1e-4, atol=1e-5)
  for _ in range(5):
    assert loss(match + 0.05 * RNG.normal(size=match.shape)) > loss(match)
  assert np.abs(jax.grad(loss)(jnp.float32(match))).max() < 1e-3


def test_update_center_and_teacher_temperature():
  center, logits = RNG.normal(size=(6,)), RNG.normal(size=(2, 5, 6))
  got = losses_silc.update_center(jnp.float32(center), jnp.float32(logits), 0.9)
  np.testing.assert_allclose(got, 0.9 * center + 0.1 * logits.reshape(-1, 6).mean(0),
                             rtol=1e-5, atol=1e-6)
  assert got.dtype == jnp.float32 and got.shape == (6,)
  temp = lambda step: float(losses_silc.teacher_temperature(step, 100, 0.04, 0.07))
  np.testing.assert_allclose([temp(0), temp(50), temp(100), temp(1000)],
                             [0.04, 0.055, 0.07, 0.07], rtol=1e-6)
  np.testing.assert_allclose(losses_silc.teacher_temperature(3, 0), 0.07, rtol=1e-6)

# ----------------------------------------------------------------------------- DINO head


def test_dino_head_shapes_and_unit_norm_prototypes():
  head = DinoHead(num_prototypes=64, hidden_dim=32, bottleneck_dim=16, num_layers=3)
  x = jnp.float32(RNG.normal(size=(5, 24)))
  params = head.init(jax.random.PRNGKey(0), x)["params"]
  shapes = jax.tree.map(lambda p: (p.shape, p.dtype), params)
  assert shapes == {"mlp_0": {"kernel": ((24, 32), jnp.float32), "bias": ((32,), jnp.float32)},
                    "mlp_1": {"kernel": ((32, 32), jnp.float32), "bias": ((32,), jnp.float32)},
                    "mlp_2": {"kernel": ((32, 16), jnp.float32), "bias": ((16,), jnp.float32)},
                    "prototypes": ((16, 64), jnp.float32)}
  logits, state = head.apply({"params": params}, x, capture_intermediates=True)
  assert logits.shape == (5, 64) and logits.dtype == jnp.float32
  # As applied: L2-normalised bottleneck features times unit-norm prototype columns.
  z = np.asarray(state["intermediates"]["mlp_2"]["__call__"][0], np.float64)
  w = np.asarray(params["prototypes"], np.float64)
  applied = np.asarray(unit_columns(params["prototypes"]))
  np.testing.assert_allclose(np.linalg.norm(applied, axis=0), 1.0, rtol=1e-6)
  expected = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  assert np.abs(logits).max() <= 1 + 1e-6  # Cosines.
  # Gain fixed to 1: rescaling a prototype leaves the logits unchanged.
  scaled = dict(params, prototypes=params["prototypes"] * jnp.linspace(0.1, 10, 64))
  np.testing.assert_allclose(head.apply({"params": scaled}, x), logits, rtol=1e-5, atol=1e-6)
  one = DinoHead(num_prototypes=8, bottleneck_dim=4, num_layers=1, dtype="bfloat16")
  xs = jnp.ones((2, 3, 24))
  out, _ = one.init_with_output(jax.random.PRNGKey(1), xs)
  assert out.shape == (2, 3, 8) and out.dtype == jnp.float32

# ----------------------------------------------------------------------------- multi-crop

H, W = 20, 24
# Channel 0 is the row, channel 1 the column: with 'nearest' sampling every output pixel
# says which source pixel it came from.
COORDS = np.stack([*np.meshgrid(np.arange(H), np.arange(W), indexing="ij"),
                   np.full((H, W), 7)], axis=-1).astype(np.float32)
SPEC = "multi_crop(32, 16, global_crops=2, local_crops=3, method='nearest')"


def run_seeds(spec: str, seeds, image: np.ndarray) -> list[dict]:
  """Applies `spec` to `image` once per seed inside tf.data (graph mode, traced once)."""
  fn = ops.get_preprocess_fn(spec)
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64))
  ds = ds.map(lambda seed: fn({"image": tf.constant(image), ops.SEED_KEY: seed}))
  return list(ds.as_numpy_iterator())


def window(crop: np.ndarray) -> tuple[int, int, int, int, bool]:
  """(top, bottom, left, right, flipped) of the source window a coordinate crop shows."""
  rows, cols = crop[..., 0], crop[..., 1]
  assert np.all(rows == rows[:, :1]) and np.all(cols == cols[:1, :])  # Axis-aligned.
  assert np.all(crop[..., 2] == 7)
  r, c = rows[:, 0], cols[0, :]
  flipped = bool(c[0] > c[-1])
  c = c[::-1] if flipped else c
  assert np.all(np.diff(r) >= 0) and np.all(np.diff(c) >= 0)
  # Upsampled with 'nearest', every source row / column of the window shows up.
  assert set(r) == set(range(int(r[0]), int(r[-1]) + 1))
  assert set(c) == set(range(int(c[0]), int(c[-1]) + 1))
  assert 0 <= r[0] and r[-1] < H and 0 <= c[0] and c[-1] < W
  return int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1, flipped


def test_multi_crop_windows_lie_in_the_image_with_the_right_areas_and_flips():
  seeds = [(5, s) for s in range(12)]
  outs = run_seeds(SPEC, seeds, COORDS)
  boxes, flips = [], []
  for out in outs:
    assert out["image_global"].shape == (2, 32, 32, 3)
    assert out["image_local"].shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(out["image"], out["image_global"][0])
    for crops, (lo, hi) in ((out["image_global"], (40, 100)), (out["image_local"], (5, 40))):
      for crop in crops:
        top, bottom, left, right, flipped = window(crop)
        assert lo / 100 <= (bottom - top) * (right - left) / (H * W) <= hi / 100
        assert 0.5 <= (right - left) / (bottom - top) <= 2
        boxes.append((top, bottom, left, right))
        flips.append(flipped)
  assert 0.2 < np.mean(flips) < 0.8
  assert len(set(boxes)) > 0.8 * len(boxes)  # Examples and crops get their own windows.
  again = run_seeds(SPEC, seeds[3:4], COORDS)[0]
  for k in ("image", "image_global", "image_local"):
    np.testing.assert_array_equal(again[k], outs[3][k])


def test_multi_crop_uint8_dtypes_value_range_keep_image_and_no_flip():
  image = RNG.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
  out = run_seeds("multi_crop(24, [8, 12], local_crops=4)|value_range(-1, 1, key='image_global')",
                  [(1, 1)], image)[0]
  assert out["image"].dtype == np.uint8 and out["image"].shape == (24, 24, 3)
  assert out["image_local"].dtype == np.uint8 and out["image_local"].shape == (4, 8, 12, 3)
  assert out["image_global"].dtype == np.float32 and out["image_global"].shape == (2, 24, 24, 3)
  assert -1 <= out["image_global"].min() and out["image_global"].max() <= 1
  np.testing.assert_allclose(out["image_global"][0], out["image"] / 127.5 - 1, atol=1e-6)
  kept = run_seeds("multi_crop(32, 16, local_crops=0, keep_image=True, flip=False, "
                   "method='nearest')", [(2, s) for s in range(6)], COORDS)
  for out in kept:
    np.testing.assert_array_equal(out["image"], COORDS)
    assert out["image_local"].shape == (0, 16, 16, 3)
    assert not any(window(crop)[-1] for crop in out["image_global"])


@pytest.mark.parametrize("spec, word", [
    ("multi_crop(global_area=(50, 40))", "global_area"),
    ("multi_crop(local_area=(0, 40))", "local_area"),
    ("multi_crop(global_crops=0)", "global_crops"),
    ("multi_crop(local_crops=-1)", "local_crops"),
    ("multi_crop(method='fancy')", "method"),
])
def test_multi_crop_bad_arguments(spec, word):
  with pytest.raises(ConfigError, match=word):
    ops.get_preprocess_fn(spec)
