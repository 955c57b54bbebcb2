"""big_vlp's LayerNorm: flax's forward pass and params, a hand-written backward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vlp.models.layernorm import LayerNorm

EPS = 1e-6


def _numpy_layer_norm_grads(x, scale, dy):
  """Gradients of sum(dy * LN(x)) by the textbook formula, in float64."""
  x, scale, dy = (np.asarray(t, np.float64) for t in (x, scale, dy))
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  rstd = 1.0 / np.sqrt(var + EPS)
  x_hat = (x - mean) * rstd
  g = dy * scale
  d = x.shape[-1]
  # d x_hat_i / d x_j = rstd * (delta_ij - 1/d - x_hat_i x_hat_j / d)
  dx = rstd * (g - g.sum(-1, keepdims=True) / d - x_hat * (g * x_hat).sum(-1, keepdims=True) / d)
  lead = tuple(range(x.ndim - 1))
  return dx, (dy * x_hat).sum(lead), dy.sum(lead)


def _inputs(shape=(3, 5, 48), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32) * 3 + 1.5
  params = {"params": {"scale": (1 + 0.3 * rng.normal(size=shape[-1:])).astype(np.float32),
                       "bias": (0.2 * rng.normal(size=shape[-1:])).astype(np.float32)}}
  dy = rng.normal(size=shape).astype(np.float32)
  return jnp.asarray(x), jax.tree.map(jnp.asarray, params), jnp.asarray(dy)


def test_params_and_init_are_flax_layer_norm():
  x, _, _ = _inputs()
  ours = LayerNorm().init(jax.random.PRNGKey(0), x)
  theirs = nn.LayerNorm().init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("x_dtype,dtype", [("float32", None), ("bfloat16", None),
                                           ("bfloat16", "bfloat16"), ("float32", "bfloat16")])
def test_forward_is_bitwise_flax(x_dtype, dtype):
  x, params, _ = _inputs()
  x = x.astype(x_dtype)
  ours = jax.jit(LayerNorm(dtype=dtype).apply)(params, x)
  theirs = jax.jit(nn.LayerNorm(dtype=dtype).apply)(params, x)
  assert ours.dtype == theirs.dtype
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))


def test_gradients_match_the_formula_and_flax_autodiff():
  x, params, dy = _inputs()

  def grads(module):
    loss = lambda p, x: jnp.sum(module.apply(p, x) * dy)
    gp, gx = jax.jit(jax.grad(loss, (0, 1)))(params, x)
    return gx, gp["params"]["scale"], gp["params"]["bias"]

  ours = grads(LayerNorm())
  want = _numpy_layer_norm_grads(x, params["params"]["scale"], dy)
  for got, ref in zip(ours, want):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  for got, ref in zip(ours, grads(nn.LayerNorm())):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_bfloat16_input_gets_a_bfloat16_gradient_from_float32_arithmetic():
  x, params, dy = _inputs()
  xb = x.astype(jnp.bfloat16)
  loss = lambda x: jnp.sum(LayerNorm(dtype=jnp.bfloat16).apply(params, x).astype(jnp.float32)
                           * dy)
  gx = jax.grad(loss)(xb)
  assert gx.dtype == jnp.bfloat16
  want, _, _ = _numpy_layer_norm_grads(np.asarray(xb, np.float32), params["params"]["scale"], dy)
  np.testing.assert_allclose(np.asarray(gx, np.float32), want, rtol=2e-2, atol=2e-2)


def test_backward_keeps_the_scale_unbroadcast():
  """The reason for the custom VJP: autodiff kept scale broadcast to x's shape as a residual,
  which XLA:CPU wrote out as a full-size array. Here the forward pass hands the backward pass
  nothing of x's shape but x itself."""
  x, params, _ = _inputs((4, 16, 64))
  f = lambda p, x: LayerNorm().apply(p, x)
  _, vjp = jax.vjp(f, params, x)
  residuals = [r for r in jax.tree.leaves(vjp) if hasattr(r, "shape")]
  assert sum(r.shape == x.shape for r in residuals) == 1, [r.shape for r in residuals]
  _, vjp_flax = jax.vjp(lambda p, x: nn.LayerNorm().apply(p, x), params, x)
  assert sum(r.shape == x.shape for r in jax.tree.leaves(vjp_flax) if hasattr(r, "shape")) > 1
