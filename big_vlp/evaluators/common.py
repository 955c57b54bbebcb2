"""Shared pieces of evaluators: jitted sharded encoders, batch placement, FILIP scoring.

Evaluation sets are small, so every process reads the whole split and the batch is placed
on the mesh from the full array; that keeps processes in lock-step on any host count.
"""

import functools
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from big_vlp import sharding
from big_vlp.config_errors import check_choice
from big_vlp.losses_filip import filip_similarities

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
  """jit-compiled encode_image / encode_text with sharded params and batches."""

  def __init__(self, model: Any, mesh: Mesh):
    self.mesh = mesh
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

  def _run(self, fn: Callable, params: Any, x: np.ndarray) -> Any:
    x, n = pad_to_multiple(x, self.dp)
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
