"""Captioning losses on decoder logits: next-token cross-entropy and sequence log-likelihood.

Targets are the caption tokens themselves (decoder inputs are shift_right(targets)); target
positions equal to `pad_id` are ignored. Logits at those positions are replaced by zeros
before the softmax, so even non-finite values there reach neither the loss nor the gradient.
"""

import jax
import jax.numpy as jnp

Stats = dict[str, jax.Array]


def _target_logprobs(logits: jax.Array, targets: jax.Array,
                     pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log p(target) [B, L] zero on padding, real-token mask [B, L], float32 logits)."""
  real = targets != pad_id
  logits = jnp.where(real[..., None], logits.astype(jnp.float32), 0.0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.where(real, picked, 0.0), real, logits


def caption_loss(logits: jax.Array, targets: jax.Array, pad_id: int) -> tuple[jax.Array, Stats]:
  """Mean next-token cross-entropy over the non-padding targets of the whole batch, and
  stats 'token_accuracy' (argmax hits among them) and 'tokens' (their count)."""
  logp, real, logits = _target_logprobs(logits, targets, pad_id)
  weights = real.astype(jnp.float32)
  # Token-weighted, as big_vision's CapPa: a long caption counts more than a short one.
  count = jnp.sum(weights)
  denom = jnp.maximum(count, 1.0)
  loss = -jnp.sum(logp) / denom
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
  return loss, {"token_accuracy": jnp.sum(hits) / denom, "tokens": count}


def sequence_logprob(logits: jax.Array, targets: jax.Array, pad_id: int) -> jax.Array:
  """float32 [B]: sum of log p(target) over each row's non-padding targets (CapPa scores a
  class by the likelihood of its name given the image)."""
  logp, _, _ = _target_logprobs(logits, targets, pad_id)
  return jnp.sum(logp, axis=1)
