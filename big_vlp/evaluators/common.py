"""Shared pieces of evaluators: jitted sharded encoders (and the captioning decoder's
decoding and likelihood scoring), batch placement, FILIP scoring.

Evaluation sets are small, so every process reads the whole split and the batch is placed
on the mesh from the full array; that keeps processes in lock-step on any host count.
"""

import functools
import math
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from big_vlp import sharding
from big_vlp.config_errors import check_choice
from big_vlp.losses_caption import sequence_logprob
from big_vlp.losses_filip import filip_similarities
from big_vlp.models import decoding
from big_vlp.models.decoder import shift_right

# config.similarity: how evaluators score an image against a text. 'pooled' is the cosine of
# the pooled embeddings; 'filip' is FILIP's token-wise late interaction.
SIMILARITIES = ("pooled", "filip")


def similarity_of(config: Any) -> str:
  """config.similarity ('pooled' when absent), checked."""
  return check_choice("similarity", config.get("similarity", "pooled"), SIMILARITIES)


def put_global(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """Places a full (identical on every process) batch split over the data axes."""
  sh = sharding.batch_sharding(mesh)
  return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
  """Zero-pads the leading dim to a multiple; returns (padded, original length)."""
  n = len(x)
  pad = (-n) % multiple
  if pad:
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
  return x, n


class Encoders:
  """jit-compiled encode_image / encode_text with sharded params and batches; for a model
  with a captioning decoder also caption decoding and prompt log-likelihoods."""

  def __init__(self, model: Any, mesh: Mesh):
    self.model, self.mesh = model, mesh
    self.dp = sharding.data_parallel_size(mesh)
    rep = sharding.replicated(mesh)
    self._img = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"),
                        out_shardings=rep)
    self._txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"),
                        out_shardings=rep)
    # Token encoders for FILIP scoring; jit compiles them only if they are called.
    self._img_tok = jax.jit(
        lambda p, x: model.apply({"params": p}, x, method="encode_image_tokens"),
        out_shardings=rep)
    self._txt_tok = jax.jit(
        lambda p, t: model.apply({"params": p}, t, method="encode_text_tokens"),
        out_shardings=rep)
    # Decoding and likelihood functions, built on first use (one per set of options).
    self._decoders: dict[tuple, Callable] = {}
    self._likelihoods: dict[int, Callable] = {}

  @property
  def has_text_tower(self) -> bool:
    """Whether the model embeds texts (False for a CapPa captioner, model.text=None)."""
    return getattr(self.model, "text", {}) is not None

  @property
  def decoder(self) -> dict[str, Any] | None:
    """The model's captioning decoder kwargs (config.model.decoder), or None."""
    decoder = getattr(self.model, "decoder", None)
    return None if decoder is None else dict(decoder)

  @property
  def decoder_pad_id(self) -> int:
    """The decoder's padding id, which is also its BOS."""
    return int((self.decoder or {}).get("pad_id", 0))

  def _run(self, fn: Callable, params: Any, x: np.ndarray, rows: int = 1) -> Any:
    # Padding to a multiple of `rows` too keeps a short last batch at the full batch's shape,
    # so it reuses the full batch's compiled function.
    x, n = pad_to_multiple(x, math.lcm(self.dp, rows))
    return jax.tree.map(lambda y: np.asarray(y)[:n], fn(params, put_global(x, self.mesh)))

  def images(self, params: Any, x: np.ndarray) -> np.ndarray:
    """L2-normalised image embeddings [N, D] (float32, on host)."""
    return self._run(self._img, params, x)

  def texts(self, params: Any, tokens: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """L2-normalised text embeddings [N, D], computed in chunks of batch_size."""
    chunks = [self._run(self._txt, params, tokens[i:i + batch_size])
              for i in range(0, len(tokens), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

  def image_tokens(self, params: Any, x: np.ndarray) -> np.ndarray:
    """L2-normalised image patch tokens [N, T, D] (float32, on host)."""
    return self._run(self._img_tok, params, x)

  def text_tokens(self, params: Any, tokens: np.ndarray, batch_size: int = 1024
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised text tokens [N, L, D], bool mask [N, L] True on real tokens)."""
    chunks = [self._run(self._txt_tok, params, tokens[i:i + batch_size])
              for i in range(0, len(tokens), batch_size)]
    if not chunks:
      return np.zeros((0, 0, 0), np.float32), np.zeros((0, 0), bool)
    return (np.concatenate([c[0] for c in chunks]),
            np.concatenate([c[1] for c in chunks]).astype(bool))

  def captions(self, params: Any, images: np.ndarray, *, eos_id: int, max_len: int,
               method: str = "greedy", beam_size: int = 4, length_penalty: float = 0.6,
               rows: int = 1) -> np.ndarray:
    """int32 [N, max_len] decoded captions (tokens, EOS, then padding) of images [N, ...].

    `method` is 'greedy' or 'beam' (models.decoding); images are padded to a multiple of
    `rows` (e.g. the eval batch size) and of the data-parallel size.
    """
    key = (method, eos_id, max_len, beam_size, length_penalty)
    if key not in self._decoders:
      self._decoders[key] = self._decode_fn(*key)
    return self._run(self._decoders[key], params, images, rows)

  def _decode_fn(self, method: str, eos_id: int, max_len: int, beam_size: int,
                 length_penalty: float) -> Callable:
    model, pad_id = self.model, self.decoder_pad_id
    opts = dict(max_len=max_len, bos_id=pad_id, eos_id=eos_id, pad_id=pad_id)
    if method == "beam":
      opts.update(beam_size=beam_size, length_penalty=length_penalty)
    search = decoding.beam_search if method == "beam" else decoding.greedy_decode

    def decode(params: Any, images: jax.Array) -> jax.Array:
      context = model.apply({"params": params}, images, method="image_context")
      logits_fn = lambda tokens, ctx: model.apply(  # noqa: E731
          {"params": params}, tokens, ctx, method="caption_logits")
      return search(logits_fn, context, **opts)

    return jax.jit(decode, out_shardings=sharding.replicated(self.mesh))

  def text_logprobs(self, params: Any, images: np.ndarray, targets: np.ndarray, *,
                    rows: int = 1, budget: int = 2**25) -> np.ndarray:
    """float32 [N, P]: log p(targets[p] | image n) under the captioning decoder, summed over
    each target's non-padding tokens (CapPa's zero-shot score).

    The image context is computed once per call; the targets [P, L] are scored in chunks of
    as many as keep one chunk's logits (images x chunk x L x vocab) within `budget`
    elements, all in one jitted call, so memory is bounded for any number of targets.
    """
    targets = np.asarray(targets, np.int32)
    n_pad = len(images) + (-len(images)) % math.lcm(self.dp, rows)
    vocab = int(self.decoder["vocab_size"])
    chunk = max(1, min(len(targets), budget // (n_pad * targets.shape[1] * vocab)))
    if chunk not in self._likelihoods:
      self._likelihoods[chunk] = self._likelihood_fn(chunk)
    fn = self._likelihoods[chunk]
    targets, n_targets = pad_to_multiple(targets, chunk)  # Extra rows: all padding.
    return self._run(lambda p, x: fn(p, x, targets), params, images, rows)[:, :n_targets]

  def _likelihood_fn(self, chunk: int) -> Callable:
    model, pad_id = self.model, self.decoder_pad_id

    def score(params: Any, images: jax.Array, targets: jax.Array) -> jax.Array:
      context = model.apply({"params": params}, images, method="image_context")
      b = context.shape[0]

      def one_chunk(tgt: jax.Array) -> jax.Array:  # tgt [chunk, L] -> [B, chunk]
        tokens = jnp.tile(tgt, (b, 1))  # Image-major: row i * chunk + j.
        ctx = jnp.repeat(context, chunk, axis=0)
        logits = model.apply({"params": params}, shift_right(tokens, pad_id), ctx,
                             method="caption_logits")
        return sequence_logprob(logits, tokens, pad_id).reshape(b, chunk)

      out = jax.lax.map(one_chunk, targets.reshape(-1, chunk, targets.shape[1]))
      return jnp.moveaxis(out, 0, 1).reshape(b, -1)

    return jax.jit(score, out_shardings=sharding.replicated(self.mesh))


@functools.partial(jax.jit, static_argnames="rows")
def _filip_chunk(img_tok: jax.Array, start: jax.Array, txt_tok: jax.Array,
                 txt_mask: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
  # The image tokens stay on the device; each call slices its chunk there.
  chunk = jax.lax.dynamic_slice_in_dim(img_tok, start, rows)
  return filip_similarities(chunk, txt_tok, txt_mask)


def filip_scores(img_tok: np.ndarray, txt_tok: np.ndarray, txt_mask: np.ndarray,
                 img_chunk: int = 64, budget: int = 2**24) -> tuple[np.ndarray, np.ndarray]:
  """FILIP (s_i2t, s_t2i) [N_img, N_txt] on host, computed in image x text chunks.

  Each jitted call scores img_chunk images against as many texts as keep its token
  similarity block within `budget` elements, so device memory is bounded for any split
  size. Chunks are padded (images of zeros, texts with no real tokens) to one shape, so
  one compile serves the whole split.
  """
  n_img, n_txt = len(img_tok), len(txt_tok)
  if not n_img or not n_txt:
    return np.zeros((n_img, n_txt), np.float32), np.zeros((n_img, n_txt), np.float32)
  rows = min(img_chunk, n_img)
  cols = int(min(n_txt, max(1, budget // (rows * img_tok.shape[1] * txt_tok.shape[1]))))
  img_dev = jax.device_put(pad_to_multiple(np.asarray(img_tok, np.float32), rows)[0])
  txt_tok, _ = pad_to_multiple(np.asarray(txt_tok, np.float32), cols)
  txt_mask, _ = pad_to_multiple(np.asarray(txt_mask, bool), cols)
  scores = np.zeros((2, len(img_dev), len(txt_tok)), np.float32)  # (s_i2t, s_t2i)
  for t0 in range(0, n_txt, cols):
    y, m = jax.device_put((txt_tok[t0:t0 + cols], txt_mask[t0:t0 + cols]))
    # Dispatch the column's chunks before reading any back, so transfers overlap compute.
    parts = [(i0, _filip_chunk(img_dev, np.int32(i0), y, m, rows=rows))
             for i0 in range(0, len(img_dev), rows)]
    for i0, part in parts:
      scores[:, i0:i0 + rows, t0:t0 + cols] = np.stack([np.asarray(p) for p in part])
  s_i2t, s_t2i = scores[:, :n_img, :n_txt]
  return s_i2t, s_t2i


def eval_batches(data: Any, cfg: Any, tokenizer: Any) -> Iterator[dict[str, np.ndarray]]:
  """The evaluator's split, pre-processed by cfg.pp, without the padding rows."""
  return iterate_unpadded(data.eval_iterator(
      name=cfg.data, split=cfg.split, data_dir=cfg.get("data_dir"), pp=cfg.pp,
      tokenizer=tokenizer, batch_size=cfg.batch_size))


def iterate_unpadded(batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
  """Drops the padding rows (``_mask`` False) that make the last eval batch full size."""
  for b in batches:
    keep = b.pop("_mask") if "_mask" in b else np.ones(len(next(iter(b.values()))), bool)
    yield {k: v[keep] for k, v in b.items()}
