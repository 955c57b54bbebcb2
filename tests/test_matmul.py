"""bfloat16-operand matmuls (models/matmul.py): values and gradients against NumPy, the
Dense / DenseGeneral patterns it takes over, and towers / train steps that use it."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax import lax

from big_vlp import sharding
from big_vlp.config_errors import ConfigError
from big_vlp.config_validation import _check_tower
from big_vlp.models import TextTransformer, ViT
from big_vlp.models.matmul import low_precision_dot_general, low_precision_matmul

RNG = np.random.default_rng(0)


def bf16_round(x) -> np.ndarray:
  """Rounds to bfloat16 (nearest even) and back to float64, independently of JAX."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def normal(*shape) -> jnp.ndarray:
  return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def test_matmul_and_both_gradients_are_bf16_products_summed_in_float32():
  x, w, g = normal(37, 24), normal(24, 19), normal(37, 19)
  y, vjp = jax.vjp(lambda a, b: low_precision_matmul(a, b, jnp.bfloat16), x, w)
  dx, dw = vjp(g)
  xr, wr, gr = bf16_round(x), bf16_round(w), bf16_round(g)
  # Products of bf16 values are exact in float32; only the float32 sums round.
  np.testing.assert_allclose(y, xr @ wr, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, gr @ wr.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, xr.T @ gr, rtol=1e-5, atol=1e-5)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  # And it is not the float32 product: rounding the operands is visible.
  assert np.abs(np.asarray(y) - np.asarray(x) @ np.asarray(w)).max() > 1e-4


def test_bf16_inputs_give_bf16_results_and_gradients():
  x, w = normal(8, 16).astype(jnp.bfloat16), normal(16, 4).astype(jnp.bfloat16)
  y, vjp = jax.vjp(lambda a, b: low_precision_matmul(a, b, jnp.bfloat16), x, w)
  dx, dw = vjp(jnp.ones_like(y))
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float64),
                             bf16_round(np.asarray(x, np.float64) @ np.asarray(w, np.float64)),
                             rtol=1e-2)


@pytest.mark.parametrize("lhs_shape,rhs_shape,n", [
    ((2, 5, 12), (12, 3, 4), 1),     # DenseGeneral q/k/v: [B, N, D] x [D, H, hd]
    ((2, 5, 3, 4), (3, 4, 12), 2),   # attention output: [B, N, H, hd] x [H, hd, D]
    ((6, 12), (12, 7), 1),           # Dense
])
def test_dense_patterns_match_flattened_reference(lhs_shape, rhs_shape, n):
  lhs, rhs = normal(*lhs_shape), normal(*rhs_shape)
  dims = ((tuple(range(len(lhs_shape) - n, len(lhs_shape))), tuple(range(n))), ((), ()))
  dot = low_precision_dot_general(jnp.bfloat16)
  f = lambda a, b: jnp.sum(jnp.sin(dot(a, b, dims)))
  ref = lambda a, b: jnp.sum(jnp.sin(lax.dot_general(
      a.astype(jnp.bfloat16).astype(jnp.float32), b.astype(jnp.bfloat16).astype(jnp.float32),
      dims, precision=lax.Precision.HIGHEST)))
  out = dot(lhs, rhs, dims)
  assert out.shape == lhs_shape[:len(lhs_shape) - n] + rhs_shape[n:]
  np.testing.assert_allclose(out, lax.dot_general(
      lhs.astype(jnp.bfloat16).astype(jnp.float32), rhs.astype(jnp.bfloat16).astype(jnp.float32),
      dims, precision=lax.Precision.HIGHEST), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(f, (0, 1))(lhs, rhs), jax.grad(ref, (0, 1))(lhs, rhs)):
    # The incoming gradient is rounded to bf16 too, so gradients agree to bf16 precision.
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def test_other_dots_are_left_to_lax():
  q, k = normal(2, 3, 5, 4), normal(2, 3, 6, 4)
  dims = (((3,), (3,)), ((0, 1), (0, 1)))  # Batched attention scores.
  dot = low_precision_dot_general(jnp.bfloat16)
  np.testing.assert_array_equal(dot(q, k, dims), lax.dot_general(q, k, dims))


def test_towers_with_bf16_matmuls_stay_close_to_float32():
  image = normal(4, 16, 16, 3)
  tokens = jnp.asarray(RNG.integers(1, 30, (4, 8)), jnp.int32)
  for cls, arg, kw in ((ViT, image, dict(patch_size=8, pool_type="map")),
                       (TextTransformer, tokens, dict(vocab_size=32, max_len=8))):
    f32 = cls(width=32, depth=2, mlp_dim=64, num_heads=2, head_dim=16, **kw)
    bf16 = f32.clone(matmul_dtype="bfloat16")
    params = f32.init(jax.random.PRNGKey(0), arg)
    # Same parameters (the option changes no shapes), close outputs and gradients.
    assert jax.tree.structure(params) == jax.tree.structure(
        bf16.init(jax.random.PRNGKey(0), arg))
    loss = lambda m: (lambda p: jnp.sum(m.apply(p, arg)[0] ** 2))
    (l32, g32), (l16, g16) = (jax.value_and_grad(loss(m))(params) for m in (f32, bf16))
    assert l16 != l32
    np.testing.assert_allclose(l16, l32, rtol=2e-2)
    total = float(optax.tree.norm(g32))
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
      assert b.dtype == jnp.float32
      # Per tensor (one element near cancellation may differ more); attention key biases
      # have a true gradient of zero (bf16 rounding of the attention backward leaves about
      # 2e-5 of the whole gradient there), hence the floor relative to the whole gradient.
      err = float(jnp.linalg.norm(b - a))
      assert err <= 0.05 * float(jnp.linalg.norm(a)) + 1e-4 * total


def test_bad_matmul_dtype_names_the_field():
  with pytest.raises(ConfigError, match=r"model.image.matmul_dtype.*'float32', 'bfloat16'"):
    _check_tower({"matmul_dtype": "fp8"}, "model.image", ("gap",))
  with pytest.raises(ConfigError, match="model.text.matmul_dtype"):
    TextTransformer(vocab_size=8, max_len=4, width=8, depth=1, mlp_dim=8, num_heads=2,
                    matmul_dtype="float16").init(jax.random.PRNGKey(0), jnp.ones((1, 4), int))


def test_train_step_with_bf16_matmuls_sharded_matches_one_device_and_float32():
  from test_train_step import run_steps, tiny_config  # pylint: disable=import-outside-toplevel
  runs = {}
  for name, mm, mesh in (("f32", "float32", {"data": 1, "fsdp": 1}),
                         ("bf16", "bfloat16", {"data": 1, "fsdp": 1}),
                         ("bf16_mesh", "bfloat16", {"data": 2, "fsdp": 2, "tensor": 2})):
    config = tiny_config(eps=1e-3)
    config.model.image.matmul_dtype = config.model.text.matmul_dtype = mm
    devices = jax.devices()[:1] if mesh["data"] == 1 else None
    m = sharding.make_mesh(mesh, devices) if devices else sharding.make_mesh(mesh)
    _, runs[name], _ = run_steps(config, m, sharding.TRANSFORMER_RULES, steps=3)
  assert np.isfinite(runs["bf16"]).all() and runs["bf16"] != runs["f32"]
  np.testing.assert_allclose(runs["bf16"], runs["f32"], rtol=2e-2)
  np.testing.assert_allclose(runs["bf16_mesh"], runs["bf16"], rtol=2e-3)
