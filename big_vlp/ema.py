"""Exponential moving average of a param tree (the SILC / DINO EMA teacher) and its schedule."""

import math
from typing import Any

import jax
import jax.numpy as jnp


def ema_update(teacher: Any, student: Any, momentum: float | jax.Array) -> Any:
  """momentum * teacher + (1 - momentum) * student per leaf, each leaf keeping its dtype.

  Both trees must have the same structure and floating-point leaves. Low-precision leaves
  are combined in float32 and cast back; keep the teacher in float32 all the same: at
  momentum 0.996 a bfloat16 teacher would round most updates away. Under jit the result
  has the teacher's sharding (an elementwise map of identically sharded trees).
  """
  momentum = jnp.asarray(momentum, jnp.float32)

  def leaf(t: jax.Array, s: jax.Array) -> jax.Array:
    if not (jnp.issubdtype(t.dtype, jnp.floating) and jnp.issubdtype(s.dtype, jnp.floating)):
      raise TypeError(f"ema_update needs floating-point leaves, got {t.dtype} and {s.dtype}")
    compute = jnp.promote_types(t.dtype, jnp.float32)
    m = momentum.astype(compute)
    out = m * t.astype(compute) + (1 - m) * s.astype(compute)
    return out.astype(t.dtype)
  return jax.tree.map(leaf, teacher, student)


def ema_momentum(step: int | jax.Array, total_steps: int, base: float = 0.996,
                 final: float = 1.0) -> jax.Array:
  """DINO's cosine schedule: `base` at step 0 rising to `final` at `total_steps` (then flat).

  SILC keeps the momentum fixed (a teacher frozen at 1.0 would stop following the
  contrastive objective late in training): pass final=base for that.
  """
  if total_steps <= 0:
    raise ValueError(f"ema_momentum: total_steps must be positive, got {total_steps}")
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  return final - (final - base) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
