"""Contrastive losses computed across devices without materialising the global logits.

The batch of B pairs is split over the mesh axes `axes` (by default ('data', 'fsdp'), the
batch axes of `big_vlp.sharding`), so each of the n devices holds b = B / n rows of each
tower's embeddings. Every function returns the same value, and the same gradients, as the
global-batch definitions in `big_vlp.losses`. Largest logits block per device:

  ring_sigmoid_loss     SigLIP, b x b. Text blocks walk the ring of the n devices with
                        `jax.lax.ppermute`; each device meets every text block once.
  ring_softmax_loss     CLIP, b x b. Text blocks walk the ring carrying the running
                        logsumexp of their columns (texts -> images); the image rows keep
                        theirs (images -> texts) locally.
  gather_softmax_loss   CLIP, b x B. "Local loss + gather with grad" (open_clip): each device
                        all-gathers the other tower and computes its b x B rows of logits in
                        both directions. Kept as the familiar reference; memory grows with n.

The ring losses have a hand-written backward pass (`jax.custom_vjp` on each device's part):
reverse mode through the forward ring would save a b x b residual per hop, i.e. b x B per
device again. Instead the forward saves only the embeddings (and for softmax the two
logsumexp vectors), and the backward walks the ring a second time, each visiting text block
travelling with its gradient accumulator, which the walk's last move returns to its owner.
So the per-device working memory of forward + backward stays flat in n at a fixed b.

The device index that the ring walks and the labels offset use is the linear index over the
combined axes (first axis major), which is the order `P(axes)` lays the batch out in.
"""

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from big_vlp import losses
from big_vlp.config_errors import check_choice

DEFAULT_AXES = ("data", "fsdp")


def _num_shards(mesh: Mesh, axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _split_count(batch: int, mesh: Mesh, axes: Sequence[str]) -> int:
  """The device count n along `axes` (mesh axes that must divide `batch`)."""
  unknown = [a for a in axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"axes {unknown} are not axes of the mesh {dict(mesh.shape)}")
  n = _num_shards(mesh, axes)
  if batch % n:
    raise ValueError(f"batch size {batch} is not divisible by the device count {n} over "
                     f"mesh axes {tuple(axes)}")
  return n


def _check_batch(zimg: jax.Array, ztxt: jax.Array, mesh: Mesh, axes: Sequence[str]) -> int:
  """Validates the [B, D] inputs and returns the device count n along `axes`."""
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(f"zimg and ztxt must both be [B, D] with the same shape; got "
                     f"{tuple(zimg.shape)} and {tuple(ztxt.shape)}")
  return _split_count(zimg.shape[0], mesh, axes)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b in float32 at highest precision (the losses are sensitive to the logit scale)."""
  return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def _block_logits(x: jax.Array, y: jax.Array, scale: jax.Array) -> jax.Array:
  """scale * x.y^T in float32 at highest precision, as `losses.pair_logits`."""
  return scale * _dot(x, y.T)


def _varying(tree: Any, axes: tuple[str, ...]) -> Any:
  """Marks values as device-varying along `axes` (gradients of replicated ones get psummed)."""
  # The custom_vjp's backward returns each device's own share of d/ds, which is
  # device-varying; pcast's transpose sums the shares into the replicated gradient. Zeros
  # that start a loop carry must be varying too, like what the loop body makes of them.
  return jax.lax.pcast(tree, axes, to="varying")


def _ring_walk(n: int, axes: tuple[str, ...], visit: Callable[..., tuple[Any, Any]],
               kept: Any, travelling: Any) -> tuple[Any, Any]:
  """Runs (kept, travelling) = visit(k, kept, travelling) at hops k = 0..n-1 of the ring.

  After each visit `travelling` moves one device along the ring (device i to i + 1), so at
  hop k device i holds what started on device i - k, and after the n-th move it is back on
  the device it started from: accumulators that travel return to their owner.
  """
  perm = [(i, (i + 1) % n) for i in range(n)]

  def body(k, carry):
    kept, travelling = visit(k, *carry)
    if n > 1:
      travelling = jax.lax.ppermute(travelling, axes, perm)
    return kept, travelling

  # All n hops, the own block's included, run in one loop: XLA then reuses one set of b x b
  # buffers for every hop. Were hop 0 outside the loop, the backward's hop-0 block would be
  # merged with the forward's identical one (common subexpressions) and kept alive in
  # between, and for n = 2 XLA would unroll the one-trip loop of the other hops and overlap
  # their blocks with hop 0's. The price is one move of the text block (b x D) per pass
  # that only brings it home.
  return jax.lax.fori_loop(0, n, body, (kept, travelling))


def _sigmoid_labels(k: jax.Array, rows: int) -> jax.Array:
  """+1 for the positives (the diagonal of hop 0's own block), -1 elsewhere."""
  i = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0)
  j = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
  # i == j + k * rows holds only on hop 0's diagonal. Written with k rather than as an eye
  # mask times (k == 0), it is not loop-invariant, so XLA fuses it into the elementwise
  # work instead of hoisting a b x b mask out of the loop and keeping it in memory.
  return jnp.where(i == j + k * rows, 1.0, -1.0).astype(jnp.float32)


def _sigmoid_block_loss(x: jax.Array, y: jax.Array, s: jax.Array, b: jax.Array,
                        labels: jax.Array) -> jax.Array:
  """-sum log_sigmoid(labels * (s x.y^T + b)) of one b x b block."""
  return -jnp.sum(jax.nn.log_sigmoid(labels * (_block_logits(x, y, s) + b)))


def _sigmoid_block_grads(x: jax.Array, y: jax.Array, s: jax.Array, b: jax.Array,
                         labels: jax.Array, ct: jax.Array) -> tuple[jax.Array, ...]:
  """ct * d(_sigmoid_block_loss)/d(x, y, s, b), in float32."""
  raw = _dot(x, y.T)
  dlogits = ct * -labels * jax.nn.sigmoid(-labels * (s * raw + b))
  return (s * _dot(dlogits, y), s * _dot(dlogits.T, x), jnp.sum(dlogits * raw),
          jnp.sum(dlogits))


def _ring_sigmoid_local(axes: tuple[str, ...], n: int) -> Callable[..., jax.Array]:
  """Per-device sum of the SigLIP terms of its image rows against all texts (custom_vjp)."""

  def fwd(x, y, s, b):
    def visit(k, total, visiting):
      labels = _sigmoid_labels(k, x.shape[0])
      return total + _sigmoid_block_loss(x, visiting, s, b, labels), visiting

    total, _ = _ring_walk(n, axes, visit, _varying(jnp.float32(0.0), axes), y)
    return total, (x, y, s, b)

  @jax.custom_vjp
  def local(x, y, s, b):
    return fwd(x, y, s, b)[0]

  def bwd(res, ct):
    x, y, s, b = res

    def visit(k, kept, travelling):
      dx, ds, db = kept
      visiting, dvisiting = travelling
      labels = _sigmoid_labels(k, x.shape[0])
      gx, gy, gs, gb = _sigmoid_block_grads(x, visiting, s, b, labels, ct)
      return (dx + gx, ds + gs, db + gb), (visiting, dvisiting + gy)

    zeros = _varying((jnp.zeros(x.shape, jnp.float32), jnp.float32(0.0),
                      jnp.float32(0.0), jnp.zeros(y.shape, jnp.float32)), axes)
    (dx, ds, db), (_, dy) = _ring_walk(n, axes, visit, zeros[:3], (y, zeros[3]))
    return dx.astype(x.dtype), dy.astype(y.dtype), ds, db

  local.defvjp(fwd, bwd)
  return local


def ring_sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array,
                      *, mesh: Mesh, axes: Sequence[str] = DEFAULT_AXES) -> jax.Array:
  """SigLIP loss of the global batch, with text blocks passed around a ring of devices.

  Equals `losses.sigmoid_loss(zimg, ztxt, scale, bias)` (value and gradients); the largest
  logits block on any device is b x b with b = B / n, forward and backward.
  """
  axes = tuple(axes)
  n = _check_batch(zimg, ztxt, mesh, axes)
  batch = zimg.shape[0]
  local_sum = _ring_sigmoid_local(axes, n)

  def local(x, y, s, b):
    s, b = _varying((s, b), axes)
    return jax.lax.psum(local_sum(x, y, s, b), axes) / batch

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                     out_specs=P())
  return fn(zimg, ztxt, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))


def _lse_stats(logits: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """(max, sum of exp(logits - max)) along `axis`: a logsumexp that blocks can extend."""
  top = jnp.max(logits, axis=axis)
  return top, jnp.sum(jnp.exp(logits - jnp.expand_dims(top, axis)), axis=axis)


def _lse_merge(a: tuple[jax.Array, jax.Array],
               b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The stats of the union of two sets of logits, without overflow."""
  top = jnp.maximum(a[0], b[0])
  return top, a[1] * jnp.exp(a[0] - top) + b[1] * jnp.exp(b[0] - top)


def _ring_softmax_local(axes: tuple[str, ...], n: int) -> Callable[..., jax.Array]:
  """Per-device CLIP terms: its image rows' and its text rows' cross-entropies (custom_vjp).

  Only text blocks travel. The b x b block x.y_v^T of the local images against a visiting
  text block is both a piece of the local image rows and a piece of the visiting texts'
  columns, so the column statistics travel with their texts and one block per hop serves
  both directions (half the matmuls of also circulating the images).
  """

  def fwd(x, y, s):
    def visit(k, rows, travelling):
      visiting, cols = travelling
      logits = _block_logits(x, visiting, s)
      return (_lse_merge(rows, _lse_stats(logits, 1)),
              (visiting, _lse_merge(cols, _lse_stats(logits, 0))))

    # Stats of no logits yet: max -inf, sum 0.
    empty = _varying((jnp.full(x.shape[:1], -jnp.inf, jnp.float32),
                      jnp.zeros(x.shape[:1], jnp.float32)), axes)
    rows, (_, cols) = _ring_walk(n, axes, visit, empty, (y, empty))
    lse_img = rows[0] + jnp.log(rows[1])
    lse_txt = cols[0] + jnp.log(cols[1])
    # The positive logits s x_i.y_i are row-wise dot products: no need for a block's diagonal.
    positives = s * jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
    total = 0.5 * (jnp.sum(lse_img) + jnp.sum(lse_txt)) - positives
    return total, (x, y, s, lse_img, lse_txt)

  @jax.custom_vjp
  def local(x, y, s):
    return fwd(x, y, s)[0]

  def bwd(res, ct):
    x, y, s, lse_img, lse_txt = res
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)

    def visit(k, kept, travelling):
      dx, ds = kept
      visiting, lse_visiting, ct_visiting, dvisiting = travelling
      raw = _dot(x, visiting.T)
      logits = s * raw
      # Row softmax weighted by this device's cotangent, column softmax by the cotangent of
      # the device whose texts these are (their cross-entropy is part of its output).
      dlogits = 0.5 * (ct * jnp.exp(logits - lse_img[:, None])
                       + ct_visiting * jnp.exp(logits - lse_visiting[None, :]))
      return ((dx + s * _dot(dlogits, visiting), ds + jnp.sum(dlogits * raw)),
              (visiting, lse_visiting, ct_visiting, dvisiting + s * _dot(dlogits.T, x)))

    # Start from the gradients of -positives; this device's texts start at home.
    kept = (-ct * s * y32, -ct * jnp.sum(x32 * y32))
    (dx, ds), (_, _, _, dy) = _ring_walk(n, axes, visit, kept, (y, lse_txt, ct, -ct * s * x32))
    return dx.astype(x.dtype), dy.astype(y.dtype), ds

  local.defvjp(fwd, bwd)
  return local


def ring_softmax_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array,
                      *, mesh: Mesh, axes: Sequence[str] = DEFAULT_AXES) -> jax.Array:
  """CLIP loss of the global batch with online logsumexps over text blocks on a ring.

  Equals `losses.softmax_loss(zimg, ztxt, scale)` (value and gradients); the largest logits
  block on any device is b x b with b = B / n, forward and backward.
  """
  axes = tuple(axes)
  n = _check_batch(zimg, ztxt, mesh, axes)
  batch = zimg.shape[0]
  local_sum = _ring_softmax_local(axes, n)

  def local(x, y, s):
    return jax.lax.psum(local_sum(x, y, _varying(s, axes)), axes) / batch

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P())
  return fn(zimg, ztxt, jnp.asarray(scale, jnp.float32))


def gather_softmax_loss(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array,
                        *, mesh: Mesh, axes: Sequence[str] = DEFAULT_AXES) -> jax.Array:
  """CLIP loss of the global batch as local b x B losses against all-gathered towers.

  Equals `losses.softmax_loss(zimg, ztxt, scale)` (value and gradients): the all-gather is
  differentiable (its transpose is a reduce-scatter), so every device's embeddings get the
  gradient from the other devices' rows. Per-device memory grows with n (b x B logits, and
  their residuals under autodiff); `ring_softmax_loss` is the flat-memory version.
  """
  axes = tuple(axes)
  _check_batch(zimg, ztxt, mesh, axes)
  batch = zimg.shape[0]

  def local(x, y, s):
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
  """Sharded mirror of `losses.contrastive_loss`: 'sigmoid' and 'softmax' both on a ring."""
  check_choice("loss", name, losses.LOSSES)
  if name == "sigmoid":
    if bias is None:
      bias = jnp.zeros((), jnp.float32)
    return ring_sigmoid_loss(zimg, ztxt, scale, bias, mesh=mesh, axes=axes)
  return ring_softmax_loss(zimg, ztxt, scale, mesh=mesh, axes=axes)
