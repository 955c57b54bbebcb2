"""The attention core (scores, softmax, weighted values) with a hand-written backward pass.

flax's `dot_product_attention` einsums in the [batch, length, heads, depth] layout; XLA:CPU
then transposes q / k / v for every batched dot, and autodiff's two backward dots that
contract the query axis (dV = P^T dO and dK = dS^T Q) contract the first non-batch axis of
both operands, which XLA:CPU's fast (YNNPACK) kernels do not take: they run as slower Eigen
code. This core works in [batch, heads, length, depth], materialises P^T and dS^T itself
(with one row of padding on CPU, which keeps XLA from folding the transpose back into the
dot; see models/matmul.py) and writes the backward pass as a custom VJP. At ViT-S/16 shapes
on a 2-core CPU it takes an attention layer's forward + backward from about 20 to 15 ms at
float32, and to about 12 ms with bfloat16 operands.

`low` (a tower's matmul_dtype) rounds the operands of all six dots to bfloat16 with float32
sums, like the Dense layers of models/matmul.py. The softmax is always float32, masked
logits get the dtype's most negative value (a fully masked row attends uniformly, as in
flax), and the result comes back in the activation dtype.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_BATCH = ((0, 1), (0, 1))  # [batch, heads] lead every operand.


def _dot(a: jax.Array, b: jax.Array, ca: int, cb: int, low: Any) -> jax.Array:
  """Batched dot over [b, h]; with `low`, operands rounded and float32 sums."""
  if low is None:
    return lax.dot_general(a, b, (((ca,), (cb,)), _BATCH))
  return lax.dot_general(a.astype(low), b.astype(low), (((ca,), (cb,)), _BATCH),
                         preferred_element_type=jnp.float32)


def _transposed(x: jax.Array, pad: bool) -> jax.Array:
  """[b, h, m, n] -> [b, h, n (+1), m], a real copy."""
  t = jnp.swapaxes(x, 2, 3)
  return jnp.pad(t, ((0, 0), (0, 0), (0, 1), (0, 0))) if pad else t


def _probs(q: jax.Array, k: jax.Array, mask: jax.Array | None, low: Any) -> jax.Array:
  logits = _dot(q, k, 3, 3, low).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _core(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, low: Any,
          pad: bool) -> jax.Array:
  """softmax(q k^T) v for q [b, h, lq, d] (already scaled), k / v [b, h, lk, d]."""
  return _core_fwd(q, k, v, mask, low, pad)[0]


def _core_fwd(q, k, v, mask, low, pad):
  p = _probs(q, k, mask, low)
  out = _dot(p.astype(v.dtype), v, 3, 2, low).astype(v.dtype)
  return out, (q, k, v, mask, p)


def _core_bwd(low, pad, res, d_out):
  q, k, v, mask, p = res
  lk = k.shape[2]
  # dV [b, h, lk, d] = P^T dO;  dP [b, h, lq, lk] = dO V^T.
  dv = _dot(_transposed(p.astype(v.dtype), pad), d_out, 3, 2, low)[:, :, :lk]
  dp = _dot(d_out, v, 3, 3, low).astype(jnp.float32)
  # Softmax backward. Masked logits are constants: no gradient reaches q or k through them
  # (their p is 0, except in a fully masked row, which attends uniformly).
  ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
  if mask is not None:
    ds = jnp.where(mask, ds, 0.0)
  ds = ds.astype(q.dtype)
  dq = _dot(ds, k, 3, 2, low)                                     # [b, h, lq, d]
  dk = _dot(_transposed(ds, pad), q, 3, 2, low)[:, :, :lk]        # [b, h, lk, d]
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None)


_core.defvjp(_core_fwd, _core_bwd)


def make_attention_fn(low: Any = None, pad: bool | None = None):
  """An `attention_fn` for flax's MultiHeadDotProductAttention (no attention dropout).

  `pad` (default: on when JAX's default backend is the CPU) pads the transposed operands of
  the two backward dots that contract the query axis; see the module docstring.
  """
  if pad is None:
    pad = jax.default_backend() == "cpu"

  def attention_fn(query: jax.Array, key: jax.Array, value: jax.Array,
                   mask: jax.Array | None = None, dtype: Any = None) -> jax.Array:
    """query [b, lq, h, d], key / value [b, lk, h, d], mask broadcastable to
    [b, h, lq, lk] (True = may attend) -> [b, lq, h, d]."""
    dtype = dtype or query.dtype
    scale = 1.0 / math.sqrt(query.shape[-1])
    to_bhld = lambda t: jnp.swapaxes(t.astype(dtype), 1, 2)
    q, k, v = to_bhld(query * jnp.asarray(scale, query.dtype)), to_bhld(key), to_bhld(value)
    if mask is not None:
      mask = mask.astype(bool)
    return jnp.swapaxes(_core(q, k, v, mask, low, pad), 1, 2)

  return attention_fn
