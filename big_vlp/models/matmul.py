"""Dense-layer matmuls with low-precision operands and float32 accumulation.

`model.<tower>.matmul_dtype='bfloat16'` rounds the two operands of every Dense / attention
projection matmul to bfloat16, accumulates in float32 and returns the result in the
activation dtype, in the forward pass and in both backward matmuls (input and weight
gradients, whose incoming gradient is rounded to bfloat16 too). LayerNorm, softmax, GELU,
residuals, the loss and the optimizer stay in the activation dtype. That is the split
torch.autocast(bfloat16) makes; accelerators with bf16 matrix units and CPUs with AMX /
AVX512-BF16 run such matmuls several times faster than float32 ones.

The backward pass is written out (custom VJP) rather than left to autodiff, because
autodiff would multiply the float32 gradient with the bfloat16 operand: a float32 matmul,
no faster. The weight gradient contracts over the batch*tokens rows, i.e. over the first
axis of both operands; XLA:CPU's fast kernels want the contracted axis of the left operand
last, and XLA folds a plain transpose back into the matmul, so the transposed activations
get one zero row of padding (sliced off the result), which keeps the transpose a real copy.
Operands are flattened to 2-D first: Dense / DenseGeneral contract the trailing axes of the
input with the leading axes of the kernel. Any other dot given to this dot_general goes to
lax.dot_general unchanged; the attention score and weighted-value dots are
models/attention.py's.
"""

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

MATMUL_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def _dense_contraction(dimension_numbers: Any, lhs_ndim: int, rhs_ndim: int) -> int | None:
  """Number of contracted axes when lhs's trailing axes meet rhs's leading ones, else None."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  n = len(lhs_c)
  if lhs_b or rhs_b or not n or n > rhs_ndim:
    return None
  if tuple(lhs_c) != tuple(range(lhs_ndim - n, lhs_ndim)) or tuple(rhs_c) != tuple(range(n)):
    return None
  return n


def _matmul_2d(x: jax.Array, w: jax.Array, low: Any) -> jax.Array:
  return lax.dot(x.astype(low), w.astype(low), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def low_precision_matmul(x: jax.Array, w: jax.Array, low: Any) -> jax.Array:
  """x [M, K] @ w [K, N] with operands rounded to `low`, accumulated in float32; the result
  has the dtype x and w promote to."""
  return _matmul_2d(x, w, low).astype(jnp.result_type(x, w))


def _fwd(x: jax.Array, w: jax.Array, low: Any) -> tuple[jax.Array, tuple[Any, ...]]:
  x_low, w_low = x.astype(low), w.astype(low)
  y = lax.dot(x_low, w_low, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))
  # Keep the rounded operands (half the memory of float32 ones); zero-size arrays carry the
  # primal dtypes the gradients must come back in.
  return y, (x_low, w_low, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _bwd(low: Any, res: tuple[Any, ...], g: jax.Array) -> tuple[jax.Array, jax.Array]:
  x_low, w_low, x_like, w_like = res
  g_low = g.astype(low)
  # dx [M, K] = g [M, N] . w [K, N]^T: contracting the last axis of both is a fast layout.
  dx = lax.dot_general(g_low, w_low, (((1,), (1,)), ((), ())),
                       preferred_element_type=jnp.float32)
  # dw [K, N] = x^T g, with x^T materialised (see the module docstring).
  x_t = jnp.pad(x_low.T, ((0, 1), (0, 0)))
  dw = lax.dot(x_t, g_low, preferred_element_type=jnp.float32)[:-1]
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


low_precision_matmul.defvjp(_fwd, _bwd)


def low_precision_dot_general(low: Any) -> Callable[..., jax.Array]:
  """A lax.dot_general replacement for flax's Dense / DenseGeneral (`dot_general=`)."""

  def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                  precision: Any = None, preferred_element_type: Any = None,
                  **kwargs: Any) -> jax.Array:
    n = _dense_contraction(dimension_numbers, lhs.ndim, rhs.ndim)
    if n is None or preferred_element_type is not None or kwargs:
      return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)
    batch_shape, out_shape = lhs.shape[:lhs.ndim - n], rhs.shape[n:]
    k = math.prod(lhs.shape[lhs.ndim - n:])
    y = low_precision_matmul(lhs.reshape(math.prod(batch_shape), k),
                             rhs.reshape(k, math.prod(out_shape)), low)
    return y.reshape(batch_shape + out_shape)

  return dot_general


def dense_dot_general(matmul_dtype: str) -> Callable[..., jax.Array] | None:
  """The `dot_general` for Dense layers of a tower with this matmul_dtype (None: default)."""
  low = MATMUL_DTYPES[matmul_dtype]
  return None if low is None else low_precision_dot_general(low)
