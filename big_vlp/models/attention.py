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
sums, like the Dense layers of models/matmul.py. On CPU the rounded q, k, v and dO are
re-laid out (`_operand`) so that XLA:CPU keeps these dots in bfloat16; without that it ran
all six as float32 dots, and the ViT-S/16 bf16-matmul step was 1.13x slower (AMD EPYC with
AVX512-BF16, 2026-12-07). The softmax is always float32, masked logits get the dtype's
most negative value (a fully masked row attends uniformly, as in flax), and the result
comes back in the activation dtype.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_BATCH = ((0, 1), (0, 1))  # [batch, heads] lead every operand.


def _dot(a: jax.Array, b: jax.Array, ca: int, cb: int, low: Any) -> jax.Array:
  """Batched dot over [b, h] of operands already in their compute dtype; with `low`, float32
  sums."""
  if low is None:
    return lax.dot_general(a, b, (((ca,), (cb,)), _BATCH))
  return lax.dot_general(a, b, (((ca,), (cb,)), _BATCH), preferred_element_type=jnp.float32)


def _operand(x: jax.Array, low: Any, pad: bool) -> jax.Array:
  """A dot operand: x rounded to `low` (if set). On CPU (`pad`) a rounded operand is also made
  a fresh array: padded by one row, which is sliced off again.

  q, k, v and dO reach the core as [b, l, h, d] -> [b, h, l, d] transposes. Before layout
  assignment XLA:CPU sees such an operand in the transposed layout, and it upcasts the
  operands of a bf16 x bf16 -> f32 dot that its YNNPACK kernels cannot take in that layout
  to float32 (its OperandUpcaster pass): the rounding is kept, the float32 dot is 2-3x
  slower. A padded copy has the default layout, and the dot stays bf16.
  """
  if low is None:
    return x
  x = x.astype(low)
  if not pad:
    return x
  n = x.shape[2]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 0)))[:, :, :n]


def _transposed(x: jax.Array, pad: bool) -> jax.Array:
  """[b, h, m, n] -> [b, h, n (+1), m], a real copy."""
  t = jnp.swapaxes(x, 2, 3)
  return jnp.pad(t, ((0, 0), (0, 0), (0, 1), (0, 0))) if pad else t


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _core(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, low: Any,
          pad: bool) -> jax.Array:
  """softmax(q k^T) v for q [b, h, lq, d] (already scaled), k / v [b, h, lk, d]."""
  return _core_fwd(q, k, v, mask, low, pad)[0]


def _core_fwd(q, k, v, mask, low, pad):
  # Operands are rounded once and kept rounded for the backward pass (half the memory of
  # float32 ones with `low`); zero-size arrays carry the dtypes the gradients come back in.
  q_op, k_op, v_op = (_operand(t, low, pad) for t in (q, k, v))
  logits = _dot(q_op, k_op, 3, 3, low).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(logits, axis=-1)
  out = _dot(p.astype(v_op.dtype), v_op, 3, 2, low).astype(v.dtype)
  dtypes = tuple(jnp.zeros((0,), t.dtype) for t in (q, k, v))
  return out, (q_op, k_op, v_op, mask, p, dtypes)


def _core_bwd(low, pad, res, d_out):
  q_op, k_op, v_op, mask, p, (q_like, k_like, v_like) = res
  lk = k_op.shape[2]
  do_op = _operand(d_out, low, pad)
  # dV [b, h, lk, d] = P^T dO;  dP [b, h, lq, lk] = dO V^T.
  dv = _dot(_transposed(p.astype(v_op.dtype), pad), do_op, 3, 2, low)[:, :, :lk]
  dp = _dot(do_op, v_op, 3, 3, low).astype(jnp.float32)
  # Softmax backward. Masked logits are constants: no gradient reaches q or k through them
  # (their p is 0, except in a fully masked row, which attends uniformly).
  ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
  if mask is not None:
    ds = jnp.where(mask, ds, 0.0)
  ds = ds.astype(q_op.dtype)
  dq = _dot(ds, k_op, 3, 2, low)                                  # [b, h, lq, d]
  dk = _dot(_transposed(ds, pad), q_op, 3, 2, low)[:, :, :lk]     # [b, h, lk, d]
  return (dq.astype(q_like.dtype), dk.astype(k_like.dtype), dv.astype(v_like.dtype), None)


_core.defvjp(_core_fwd, _core_bwd)


def make_attention_fn(low: Any = None, pad: bool | None = None):
  """An `attention_fn` for flax's MultiHeadDotProductAttention (no attention dropout).

  `pad` (default: on when JAX's default backend is the CPU) pads the transposed operands of
  the two backward dots that contract the query axis and, with `low`, re-lays out the
  rounded q, k, v and dO (`_operand`); see the module docstring.
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
