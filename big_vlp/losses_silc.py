"""SILC's self-distillation loss: DINO's centred, sharpened cross-entropy between crop views.

View layout. Logits are stacked per view, [views, B, K], each view holding one crop of every
example of the batch:
  teacher views = [global_0, ..., global_{T-1}]                    (the EMA teacher's crops)
  student views = [global_0, ..., global_{T-1}, local_0, ...]      student_has_globals=True
                = [local_0, ...]                                   student_has_globals=False
With the globals first in the student (DINO's layout), student view i < T is the very crop
the teacher saw as view i; that pair carries no cross-view signal and is skipped, as DINO
does. Every other (teacher view, student view) pair counts once.
"""

import jax
import jax.numpy as jnp
import numpy as np


def pair_mask(num_student: int, num_teacher: int, student_has_globals: bool) -> np.ndarray:
  """bool [T, S]: which (teacher view, student view) pairs the loss averages over."""
  mask = np.ones((num_teacher, num_student), bool)
  if student_has_globals:
    if num_student < num_teacher:
      raise ValueError(f"student_has_globals needs the student's first views to be the "
                       f"teacher's {num_teacher} global views, but it has {num_student} views")
    mask[np.arange(num_teacher), np.arange(num_teacher)] = False
  if not mask.any():
    raise ValueError(f"no (teacher, student) view pairs left: {num_teacher} teacher views, "
                     f"{num_student} student views, all the same crops")
  return mask


def dino_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array,
              student_temp: float | jax.Array = 0.1, teacher_temp: float | jax.Array = 0.04,
              *, student_has_globals: bool = True) -> jax.Array:
  """Mean over view pairs and examples of CE(softmax((t - center) / Tt), softmax(s / Ts)).

  student_logits [S, B, K], teacher_logits [T, B, K], center [K]; views laid out as in the
  module docstring. No gradient flows to the teacher logits or the center.
  """
  if student_logits.ndim != 3 or teacher_logits.ndim != 3:
    raise ValueError(f"dino_loss wants [views, B, K] logits, got student "
                     f"{student_logits.shape} and teacher {teacher_logits.shape}")
  if student_logits.shape[1:] != teacher_logits.shape[1:]:
    raise ValueError(f"student {student_logits.shape} and teacher {teacher_logits.shape} "
                     "logits disagree on [B, K]")
  mask = pair_mask(student_logits.shape[0], teacher_logits.shape[0], student_has_globals)
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  center = jax.lax.stop_gradient(jnp.asarray(center, jnp.float32))
  targets = jax.nn.softmax((teacher - center) / teacher_temp, axis=-1)
  log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  # Full precision: on TPU the default would round the probabilities to bfloat16 in the dot.
  ce = -jnp.einsum("tbk,sbk->tsb", targets, log_probs, precision=jax.lax.Precision.HIGHEST)
  per_pair = jnp.mean(ce, axis=-1)
  return jnp.sum(jnp.where(mask, per_pair, 0.0)) / mask.sum()


def update_center(center: jax.Array, teacher_logits: jax.Array,
                  momentum: float | jax.Array = 0.9) -> jax.Array:
  """EMA of the teacher logits' mean over all views and examples (DINO's centering)."""
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  batch_center = jnp.mean(teacher.reshape(-1, teacher.shape[-1]), axis=0)
  return momentum * jnp.asarray(center, jnp.float32) + (1 - momentum) * batch_center


def teacher_temperature(step: int | jax.Array, warmup_steps: int, start: float = 0.04,
                        end: float = 0.07) -> jax.Array:
  """DINO's teacher temperature: linear from `start` at step 0 to `end` at warmup_steps."""
  if warmup_steps <= 0:
    return jnp.asarray(end, jnp.float32)
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
  return start + (end - start) * progress
