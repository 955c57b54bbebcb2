"""LayerNorm with a hand-written backward pass; the forward pass and params are flax's.

Autodiff of `(x - mean) * (rsqrt(var + eps) * scale) + bias` keeps the scale broadcast to the
activation's full shape as a residual for the backward pass, and XLA:CPU materialises that
broadcast: one [batch, tokens, width] float32 array written and read again per LayerNorm,
48 of them in a ViT-S/16 two-tower step. This VJP keeps x, the mean, the reciprocal standard
deviation and the [width] scale, and computes the input gradient in one pass:

  x_hat = (x - mean) * rstd,  g = dy * scale
  dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
  dscale = sum(dy * x_hat),  dbias = sum(dy)   (over all but the last axis)

Statistics and arithmetic are float32 whatever x's dtype (flax's force_float32_reductions),
with flax's fast variance max(0, E[x^2] - E[x]^2); the output is bitwise flax's
`nn.LayerNorm` output. In a 2-core CPU ViT-S/16 batch-8 step with bf16 matmuls, both
versions built in one process and alternated: 1.065x (2026-12-07).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _stats(x32: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  mean = jnp.mean(x32, -1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(x32 * x32, -1, keepdims=True) - mean * mean)
  return mean, lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
               dtype: Any) -> jax.Array:
  """LayerNorm over the last axis of x with [width] scale and bias; result in `dtype`."""
  return _fwd(x, scale, bias, eps, dtype)[0]


def _fwd(x, scale, bias, eps, dtype):
  x32 = x.astype(jnp.float32)
  mean, rstd = _stats(x32, eps)
  y = (x32 - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
  return y.astype(dtype), (x, mean, rstd, scale, jnp.zeros((0,), bias.dtype))


def _bwd(eps, dtype, res, dy):
  del eps, dtype
  x, mean, rstd, scale, bias_like = res
  dy = dy.astype(jnp.float32)
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  g = dy * scale.astype(jnp.float32)
  dx = rstd * (g - jnp.mean(g, -1, keepdims=True)
               - x_hat * jnp.mean(g * x_hat, -1, keepdims=True))
  leading = tuple(range(x.ndim - 1))
  return (dx.astype(x.dtype), jnp.sum(dy * x_hat, leading).astype(scale.dtype),
          jnp.sum(dy, leading).astype(bias_like.dtype))


layer_norm.defvjp(_fwd, _bwd)


class LayerNorm(nn.Module):
  """flax's `nn.LayerNorm` (last axis, scale and bias, same param names, shapes, initial
  values and outputs) with the backward pass above."""
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (width,), self.param_dtype)
    # flax's output dtype: `dtype`, else what x and the params promote to.
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    return layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))
