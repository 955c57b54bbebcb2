"""FILIP token-wise late-interaction similarity and loss (Yao et al. 2021), global and sharded.

Image i has patch tokens x_ip (p = 1..N), text j has tokens y_jt (t = 1..L) with a mask that
is False on padding; all tokens are L2-normalised. With tok_sim[i, j, p, t] = <x_ip, y_jt>:

  s_i2t[i, j] = mean_p  max_{real t} tok_sim      (each patch finds its best word)
  s_t2i[i, j] = mean_{real t}  max_p tok_sim      (each word finds its best patch)

Padding never enters a max or a mean; a text without real tokens scores 0. The losses use
s_i2t for the image -> text direction and s_t2i for text -> image:

  softmax: 0.5 * (mean_i CE(s * s_i2t[i, :], i) + mean_j CE(s * s_t2i[:, j], j))
  sigmoid: 0.5 * (SigLIP(s * s_i2t + b) + SigLIP(s * s_t2i + b)),  SigLIP as in big_vlp.losses

`filip_loss_sharded` gives the same values and gradients with the batch split over mesh axes:
text token blocks walk a ring of devices, so no device holds more than one b x b x N x L block
of token similarities (b = local batch), forward or backward.
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from big_vlp import sharding
from big_vlp.config_errors import check_choice
# The ring machinery is shared with the pooled ring losses.
from big_vlp.losses_sharded import _ring_walk, _split_count, _varying

Stats = dict[str, jax.Array]
# Own list, not losses.LOSSES: a loss added there has no FILIP form until written here.
FILIP_LOSSES = ("softmax", "sigmoid")


def filip_similarities(img_tok: jax.Array, txt_tok: jax.Array,
                       txt_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(s_i2t, s_t2i), both float32 [Bi, Bt], from tokens [Bi, N, D], [Bt, L, D] and mask [Bt, L]."""
  sim = jnp.einsum("ipd,jtd->ijpt", img_tok.astype(jnp.float32), txt_tok.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  mask = jnp.asarray(txt_mask, bool)
  real = mask[None, :, None, :]  # [1, Bt, 1, L]
  count = jnp.sum(mask, axis=1).astype(jnp.float32)  # [Bt]
  # -inf keeps padding out of the max; a text of padding only has a -inf max, replaced by 0
  # before the mean (the gradient into the -inf branch is then zero, not NaN).
  best_word = jnp.max(jnp.where(real, sim, -jnp.inf), axis=3)  # [Bi, Bt, N]
  best_word = jnp.where((count > 0)[None, :, None], best_word, 0.0)
  s_i2t = jnp.mean(best_word, axis=2)
  best_patch = jnp.where(real[:, :, 0, :], jnp.max(sim, axis=2), 0.0)  # [Bi, Bt, L]
  s_t2i = jnp.sum(best_patch, axis=2) / jnp.maximum(count, 1.0)[None, :]
  return s_i2t, s_t2i


def _check_name(name: str) -> None:
  check_choice("loss", name, FILIP_LOSSES)


def _check_inputs(img_tok: jax.Array, txt_tok: jax.Array, txt_mask: jax.Array) -> None:
  """The towers' token arrays must describe the same B pairs in the same width."""
  if img_tok.ndim != 3 or txt_tok.ndim != 3 or txt_mask.ndim != 2:
    raise ValueError(f"expected img_tok [B, N, D], txt_tok [B, L, D], txt_mask [B, L]; got "
                     f"{tuple(img_tok.shape)}, {tuple(txt_tok.shape)}, "
                     f"{tuple(txt_mask.shape)}")
  if (img_tok.shape[0] != txt_tok.shape[0] or img_tok.shape[2] != txt_tok.shape[2]
      or txt_mask.shape != txt_tok.shape[:2]):
    raise ValueError(f"img_tok {tuple(img_tok.shape)}, txt_tok {tuple(txt_tok.shape)} and "
                     f"txt_mask {tuple(txt_mask.shape)} disagree on the batch, width or "
                     "text length")


def _scalars(name: str, scale: Any, bias: Any) -> tuple[jax.Array, jax.Array]:
  """float32 scale and the bias the loss adds (0 for softmax, and for sigmoid without one)."""
  scale = jnp.asarray(scale, jnp.float32)
  if name == "softmax" or bias is None:
    return scale, jnp.zeros((), jnp.float32)
  return scale, jnp.asarray(bias, jnp.float32)


def filip_loss(name: str, img_tok: jax.Array, txt_tok: jax.Array, txt_mask: jax.Array,
               scale: jax.Array, bias: jax.Array | None) -> tuple[jax.Array, Stats]:
  """FILIP loss `name` ('softmax' or 'sigmoid') of B pairs, with pos/neg logit stats."""
  _check_name(name)
  _check_inputs(img_tok, txt_tok, txt_mask)
  s, b = _scalars(name, scale, bias)
  s_i2t, s_t2i = filip_similarities(img_tok, txt_tok, txt_mask)
  li2t, lt2i = s * s_i2t + b, s * s_t2i + b
  n = li2t.shape[0]
  if name == "softmax":
    i2t = jax.nn.logsumexp(li2t, axis=1) - jnp.diagonal(li2t)
    t2i = jax.nn.logsumexp(lt2i, axis=0) - jnp.diagonal(lt2i)
    loss = 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))
  else:
    z = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
    loss = -0.5 * (jnp.sum(jax.nn.log_sigmoid(z * li2t))
                   + jnp.sum(jax.nn.log_sigmoid(z * lt2i))) / n
  sym = 0.5 * (li2t + lt2i)
  pos = jnp.trace(sym)
  stats = {"pos_logit": pos / n, "neg_logit": (jnp.sum(sym) - pos) / max(n * (n - 1), 1)}
  return loss, stats


def _filip_rows(axes: tuple[str, ...], n: int) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Per-device [b, B] rows of s_i2t and s_t2i for its images against all texts (custom_vjp).

  Text tokens and their mask walk the ring; column block c of the rows holds device c's
  texts. The backward walks the ring again with each text block carrying its gradient home
  and recomputes one block per hop (what jax.checkpoint on the block would do), so the only
  residuals are this device's inputs. Reverse mode through the forward ring, even with
  checkpointed blocks, would keep every visiting text block: B x L x D per device.
  """
  def columns(k: jax.Array, b: int) -> jax.Array:
    # At hop k this device (ring index i) holds the texts of device i - k.
    return ((jax.lax.axis_index(axes) - k) % n) * b

  def fwd(x, y, m):
    b = x.shape[0]

    def visit(k, rows, travelling):
      y_v, m_v = travelling
      start = columns(k, b)
      new = filip_similarities(x, y_v, m_v)
      rows = tuple(jax.lax.dynamic_update_slice(r, v, (0, start)) for r, v in zip(rows, new))
      return rows, travelling

    empty = _varying((jnp.zeros((b, n * b), jnp.float32),) * 2, axes)
    rows, _ = _ring_walk(n, axes, visit, empty, (y, m))
    return rows, (x, y, m)

  @jax.custom_vjp
  def rows_fn(x, y, m):
    return fwd(x, y, m)[0]

  def bwd(res, ct):
    x, y, m = res
    b = x.shape[0]

    def visit(k, dx, travelling):
      y_v, m_v, dy_v = travelling
      start = columns(k, b)
      ct_block = tuple(jax.lax.dynamic_slice(c, (0, start), (b, b)) for c in ct)
      _, pull = jax.vjp(lambda x, y: filip_similarities(x, y, m_v), x, y_v)
      gx, gy = pull(ct_block)
      return dx + gx, (y_v, m_v, dy_v + gy)

    zeros = _varying((jnp.zeros(x.shape, jnp.float32), jnp.zeros(y.shape, jnp.float32)),
                     axes)
    dx, (_, _, dy) = _ring_walk(n, axes, visit, zeros[0], (y, m, zeros[1]))
    return dx.astype(x.dtype), dy.astype(y.dtype), None

  rows_fn.defvjp(fwd, bwd)
  return rows_fn


def filip_loss_sharded(name: str, img_tok: jax.Array, txt_tok: jax.Array,
                       txt_mask: jax.Array, scale: jax.Array, bias: jax.Array | None,
                       mesh: Mesh, axes: Sequence[str] = sharding.BATCH_AXES
                       ) -> tuple[jax.Array, Stats]:
  """`filip_loss` with the batch split over mesh `axes`; text tokens walk a ring of devices.

  Same value, stats and gradients as `filip_loss`; no device holds more than one
  b x b x N x L block of token similarities, and the loss itself needs only [b, B] rows and
  [B] column statistics per device.
  """
  _check_name(name)
  _check_inputs(img_tok, txt_tok, txt_mask)
  axes = tuple(axes)
  batch = img_tok.shape[0]
  n = _split_count(batch, mesh, axes)
  rows_fn = _filip_rows(axes, n)

  def local(x, y, m, s, bias_):
    s, bias_ = _varying((s, bias_), axes)
    r_i2t, r_t2i = rows_fn(x, y, m)
    li2t, lt2i = s * r_i2t + bias_, s * r_t2i + bias_  # [b, B]
    b = x.shape[0]
    first = jax.lax.axis_index(axes) * b  # global index of this device's first pair
    own = jnp.arange(b)
    pos_i2t = li2t[own, first + own]
    pos_t2i = lt2i[own, first + own]
    if name == "softmax":
      i2t = jax.nn.logsumexp(li2t, axis=1) - pos_i2t
      # Column logsumexps of text -> image over all devices' image rows: a shift that is the
      # same everywhere (its gradient cancels), then a psum of the shifted exponentials.
      top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(lt2i, axis=0)), axes)  # [B]
      col_lse = top + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(lt2i - top), axis=0), axes))
      t2i = jax.lax.dynamic_slice(col_lse, (first,), (b,)) - pos_t2i
      part = 0.5 * (jnp.sum(i2t) + jnp.sum(t2i))
    else:
      z = jnp.where(own[:, None] + first == jnp.arange(li2t.shape[1])[None, :], 1.0, -1.0)
      part = -0.5 * (jnp.sum(jax.nn.log_sigmoid(z * li2t))
                     + jnp.sum(jax.nn.log_sigmoid(z * lt2i)))
    sym = 0.5 * (li2t + lt2i)
    pos_sum = 0.5 * jnp.sum(pos_i2t + pos_t2i)
    total, pos_sum, all_sum = jax.lax.psum((part, pos_sum, jnp.sum(sym)), axes)
    stats = {"pos_logit": pos_sum / batch,
             "neg_logit": (all_sum - pos_sum) / max(batch * (batch - 1), 1)}
    return total / batch, stats

  s, b = _scalars(name, scale, bias)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(axes), P(), P()),
                     out_specs=(P(), {"pos_logit": P(), "neg_logit": P()}))
  return fn(img_tok, txt_tok, jnp.asarray(txt_mask, bool), s, b)
