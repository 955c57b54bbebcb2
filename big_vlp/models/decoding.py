"""Greedy and beam-search caption decoding, jit-compatible with a fixed maximum length.

Both work on `logits_fn(tokens [B', L], context) -> logits [B', L, V]`, where `context` is
any pytree of arrays with a leading batch dimension (e.g. the image tokens) and `tokens` are
decoder inputs (BOS, then the tokens produced so far, padding after). The decoder is re-run
on the whole prefix at every step (no KV cache): captions are short. For a TextDecoder:

  logits_fn = lambda toks, img: decoder.apply(params, toks, img)

Outputs are int32 [B, max_len] in the tokenizers' layout: caption tokens, EOS, then pad_id.
A row that never produces EOS fills all max_len positions. pad_id is never generated (it is
never a training target).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from big_vlp.models.decoder import shift_right

LogitsFn = Callable[[jax.Array, Any], jax.Array]


def _batch_size(context: Any) -> int:
  leaves = jax.tree.leaves(context)
  if not leaves:
    raise ValueError("context must hold at least one array with a leading batch dimension")
  return leaves[0].shape[0]


def _step_logprobs(logits_fn: LogitsFn, out: jax.Array, context: Any, t: jax.Array,
                   bos_id: int, pad_id: int) -> jax.Array:
  """float32 [B', V]: log-probabilities of the token at position t given out[:, :t]."""
  logits = logits_fn(shift_right(out, bos_id), context)
  logits = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
  logits = logits.astype(jnp.float32).at[:, pad_id].set(-jnp.inf)
  return jax.nn.log_softmax(logits, axis=-1)


def greedy_decode(logits_fn: LogitsFn, context: Any, *, max_len: int, bos_id: int,
                  eos_id: int, pad_id: int) -> jax.Array:
  """int32 [B, max_len]: the most likely next token at each step, until EOS per row."""
  b = _batch_size(context)

  def cond(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    t, _, done = state
    return (t < max_len) & ~jnp.all(done)

  def body(state: tuple[jax.Array, jax.Array, jax.Array]
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    t, out, done = state
    logp = _step_logprobs(logits_fn, out, context, t, bos_id, pad_id)
    tok = jnp.where(done, pad_id, jnp.argmax(logp, axis=-1).astype(jnp.int32))
    return t + 1, out.at[:, t].set(tok), done | (tok == eos_id)

  init = (jnp.int32(0), jnp.full((b, max_len), pad_id, jnp.int32), jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, init)[1]


def beam_search(logits_fn: LogitsFn, context: Any, *, max_len: int, bos_id: int,
                eos_id: int, pad_id: int, beam_size: int = 4,
                length_penalty: float = 0.6) -> jax.Array:
  """int32 [B, max_len]: per example, the finished beam with the highest
  sum log-prob / length**length_penalty (length counts EOS; unfinished beams end at max_len).

  Each step expands the K live beams, keeps the best 2K candidates (so K of them are not
  EOS), moves those that end into a pool of K finished beams and keeps the K best unfinished
  ones live. A row stops once no live beam can beat its best finished one.
  """
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  if length_penalty < 0:
    # The stopping bound assumes longer is never penalised more than shorter.
    raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
  b, k = _batch_size(context), beam_size
  ctx = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), context)  # [B*K, ...]
  neg = jnp.float32(-jnp.inf)

  def norm(logp: jax.Array, length: jax.Array) -> jax.Array:
    return logp / jnp.power(length.astype(jnp.float32), length_penalty)

  def cond(state: tuple[jax.Array, ...]) -> jax.Array:
    t, _, alive_lp, _, fin_score = state
    # Log-probs only fall as beams grow and length_penalty >= 0 rewards length at most up
    # to max_len, so this bounds what any live beam can still score.
    bound = norm(jnp.max(alive_lp, axis=1), jnp.int32(max_len))
    return (t < max_len) & ~jnp.all(bound < jnp.max(fin_score, axis=1))

  def body(state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    t, alive_seq, alive_lp, fin_seq, fin_score = state
    logp = _step_logprobs(logits_fn, alive_seq.reshape(b * k, max_len), ctx, t,
                          bos_id, pad_id)
    vocab = logp.shape[-1]
    cand = (alive_lp[:, :, None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
    top_lp, top_idx = jax.lax.top_k(cand, min(2 * k, k * vocab))
    tok = (top_idx % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(alive_seq, (top_idx // vocab)[:, :, None], axis=1)
    seqs = seqs.at[:, :, t].set(tok)
    ends = (tok == eos_id) | (t == max_len - 1)

    new_score = jnp.where(ends, norm(top_lp, t + 1), neg)
    fin_score, idx = jax.lax.top_k(jnp.concatenate([fin_score, new_score], axis=1), k)
    fin_seq = jnp.take_along_axis(jnp.concatenate([fin_seq, seqs], axis=1),
                                  idx[:, :, None], axis=1)
    alive_lp, idx = jax.lax.top_k(jnp.where(tok == eos_id, neg, top_lp), k)
    alive_seq = jnp.take_along_axis(seqs, idx[:, :, None], axis=1)
    return t + 1, alive_seq, alive_lp, fin_seq, fin_score

  seqs = jnp.full((b, k, max_len), pad_id, jnp.int32)
  # One live beam to start with: K copies of the empty prefix would fill the beam with
  # duplicates of the same candidates.
  alive_lp = jnp.full((b, k), neg).at[:, 0].set(0.0)
  init = (jnp.int32(0), seqs, alive_lp, seqs, jnp.full((b, k), neg))
  _, _, _, fin_seq, fin_score = jax.lax.while_loop(cond, body, init)
  best = jnp.argmax(fin_score, axis=1)
  return jnp.take_along_axis(fin_seq, best[:, None, None], axis=1)[:, 0]
