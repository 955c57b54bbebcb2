"""Contrastive losses on L2-normalised tower outputs, selected by name from the config.

Both losses follow the definitions in the project's reference (global batch of N pairs):
  softmax: 0.5 * (mean_i CE(l_i., i) + mean_j CE(l_.j, j)),  l = s * x.y^T
  sigmoid: -(1/N) * sum_ij log_sigmoid(z_ij * l_ij),          l = s * x.y^T + b
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from big_vlp.config_errors import check_choice

# Standard init of the learned log-temperature t and bias b per loss (CLIP and SigLIP papers).
INIT_VALUES = {
    "softmax": {"temperature_init": math.log(1 / 0.07), "bias_init": None},
    "sigmoid": {"temperature_init": math.log(10.0), "bias_init": -10.0},
}


def pair_logits(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array) -> jax.Array:
  """scale * zimg . ztxt^T in float32 at highest precision (the losses are sensitive to the
  logit scale)."""
  zimg = zimg.astype(jnp.float32)
  ztxt = ztxt.astype(jnp.float32)
  return scale * jnp.matmul(zimg, ztxt.T, precision=jax.lax.Precision.HIGHEST)


def softmax_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE (CLIP) loss of N matching image/text pairs."""
  logits = pair_logits(zimg, ztxt, scale)
  diag = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - diag
  t2i = jax.nn.logsumexp(logits, axis=0) - diag
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


def sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array,
                 bias: jax.Array) -> jax.Array:
  """SigLIP loss: pairwise binary log-likelihood summed over N*N pairs, divided by N."""
  logits = pair_logits(zimg, ztxt, scale) + bias
  n = logits.shape[0]
  labels = 2.0 * jnp.eye(n, dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n


def logit_stats(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array,
                bias: jax.Array | None) -> dict[str, jax.Array]:
  """Mean positive (matching) and negative logits, for logging."""
  logits = pair_logits(zimg, ztxt, scale)
  if bias is not None:
    logits = logits + bias
  n = logits.shape[0]
  pos = jnp.trace(logits) / n
  neg = (jnp.sum(logits) - jnp.trace(logits)) / max(n * (n - 1), 1)
  return {"pos_logit": pos, "neg_logit": neg}


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """KL(teacher || student) of the softmax over each row (image->text) and each column
  (text->image) of [N, N] logits, averaged over rows / columns and the two directions."""
  s = student_logits.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))

  def kl(axis: int) -> jax.Array:
    log_pt = jax.nn.log_softmax(t, axis=axis)
    log_ps = jax.nn.log_softmax(s, axis=axis)
    return jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=axis))
  return 0.5 * (kl(1) + kl(0))


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "softmax": softmax_loss,
    "sigmoid": sigmoid_loss,
}


def contrastive_loss(name: str, zimg: jax.Array, ztxt: jax.Array, scale: jax.Array,
                     bias: jax.Array | None) -> jax.Array:
  """Dispatches to the loss called `name` (config field `loss`)."""
  check_choice("loss", name, LOSSES)
  if name == "sigmoid":
    if bias is None:
      bias = jnp.zeros((), jnp.float32)
    return sigmoid_loss(zimg, ztxt, scale, bias)
  return softmax_loss(zimg, ztxt, scale)
