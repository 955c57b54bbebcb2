"""Contrastive losses computed across devices without materialising the global logits.

The batch of B pairs is split over the mesh axes `axes` (by default ('data', 'fsdp'), the
batch axes of `big_vlp.sharding`), so each of the n devices holds b = B / n rows of each
tower's embeddings. Both functions return the same value, and the same gradients, as the
global-batch definitions in `big_vlp.losses`:

  ring_sigmoid_loss     SigLIP. Text blocks walk the ring of the n devices with
                        `jax.lax.ppermute` (n - 1 hops); every device only ever builds b x b
                        logits blocks, so memory is linear in the batch.
  gather_softmax_loss   CLIP. "Local loss + gather with grad" (open_clip): each device
                        all-gathers the other tower and computes its b x B rows of logits
                        in both directions (softmax needs the full row for the normaliser).

The device index that the ring walks and the labels offset use is the linear index over the
combined axes (first axis major), which is the order `P(axes)` lays the batch out in.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from big_vlp import losses
from big_vlp.config_errors import check_choice

DEFAULT_AXES = ("data", "fsdp")


def _num_shards(mesh: Mesh, axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _check_batch(zimg: jax.Array, ztxt: jax.Array, mesh: Mesh, axes: Sequence[str]) -> int:
  """Validates the [B, D] inputs and returns the device count n along `axes`."""
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(f"zimg and ztxt must both be [B, D] with the same shape; got "
                     f"{tuple(zimg.shape)} and {tuple(ztxt.shape)}")
  unknown = [a for a in axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"axes {unknown} are not axes of the mesh {dict(mesh.shape)}")
  n = _num_shards(mesh, axes)
  batch = zimg.shape[0]
  if batch % n:
    raise ValueError(f"batch size {batch} is not divisible by the device count {n} over "
                     f"mesh axes {tuple(axes)}")
  return n


def _block_logits(x: jax.Array, y: jax.Array, scale: jax.Array) -> jax.Array:
  """scale * x.y^T in float32 at highest precision, as `losses._logits`."""
  return scale * jnp.matmul(x.astype(jnp.float32), y.astype(jnp.float32).T,
                            precision=jax.lax.Precision.HIGHEST)


def ring_sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array,
                      *, mesh: Mesh, axes: Sequence[str] = DEFAULT_AXES) -> jax.Array:
  """SigLIP loss of the global batch, with text blocks passed around a ring of devices.

  Equals `losses.sigmoid_loss(zimg, ztxt, scale, bias)` (value and gradients); the largest
  logits block on any device is b x b with b = B / n.
  """
  axes = tuple(axes)
  n = _check_batch(zimg, ztxt, mesh, axes)
  batch = zimg.shape[0]
  # Device i sends its visiting text block to device i + 1, so after k hops device i holds
  # the block that started on device i - k.
  perm = [(i, (i + 1) % n) for i in range(n)]

  def local(x, y, s, b):
    s = jnp.asarray(s, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    rows = x.shape[0]
    # Hop 0: this device's own texts; positives on the diagonal.
    labels = 2.0 * jnp.eye(rows, dtype=jnp.float32) - 1.0
    total = -jnp.sum(jax.nn.log_sigmoid(labels * (_block_logits(x, y, s) + b)))

    def hop(_, carry):
      acc, visiting = carry
      visiting = jax.lax.ppermute(visiting, axes, perm)
      # Texts from another device: all pairs are negatives.
      acc = acc - jnp.sum(jax.nn.log_sigmoid(-(_block_logits(x, visiting, s) + b)))
      return acc, visiting

    if n > 1:
      total, _ = jax.lax.fori_loop(0, n - 1, hop, (total, y))
    return jax.lax.psum(total, axes) / batch

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                     out_specs=P())
  return fn(zimg, ztxt, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))


def gather_softmax_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array,
                        *, mesh: Mesh, axes: Sequence[str] = DEFAULT_AXES) -> jax.Array:
  """CLIP loss of the global batch as local b x B losses against all-gathered towers.

  Equals `losses.softmax_loss(zimg, ztxt, scale)` (value and gradients): the all-gather is
  differentiable (its transpose is a reduce-scatter), so every device's embeddings get the
  gradient from the other devices' rows.
  """
  axes = tuple(axes)
  _check_batch(zimg, ztxt, mesh, axes)
  batch = zimg.shape[0]

  def local(x, y, s):
    s = jnp.asarray(s, jnp.float32)
    rows = x.shape[0]
    x_all = jax.lax.all_gather(x, axes, tiled=True)  # [B, D]
    y_all = jax.lax.all_gather(y, axes, tiled=True)
    labels = jax.lax.axis_index(axes) * rows + jnp.arange(rows)

    def direction(a, others):
      logits = _block_logits(a, others, s)  # [b, B]
      pos = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
      return jnp.sum(jax.nn.logsumexp(logits, axis=1) - pos)

    total = 0.5 * (direction(x, y_all) + direction(y, x_all))
    return jax.lax.psum(total, axes) / batch

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P())
  return fn(zimg, ztxt, jnp.asarray(scale, jnp.float32))


def contrastive_loss_sharded(name: str, zimg: jax.Array, ztxt: jax.Array, scale: jax.Array,
                             bias: jax.Array | None, mesh: Mesh,
                             axes: Sequence[str] = DEFAULT_AXES) -> jax.Array:
  """Sharded mirror of `losses.contrastive_loss`: 'sigmoid' -> ring, 'softmax' -> gather."""
  check_choice("loss", name, losses.LOSSES)
  if name == "sigmoid":
    if bias is None:
      bias = jnp.zeros((), jnp.float32)
    return ring_sigmoid_loss(zimg, ztxt, scale, bias, mesh=mesh, axes=axes)
  return gather_softmax_loss(zimg, ztxt, scale, mesh=mesh, axes=axes)
