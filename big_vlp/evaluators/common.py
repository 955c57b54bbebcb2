"""Shared pieces of evaluators: jitted sharded encoders and batch placement.

Evaluation sets are small, so every process reads the whole split and the batch is placed
on the mesh from the full array; that keeps processes in lock-step on any host count.
"""

from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from big_vlp import sharding


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

  def _run(self, fn: Callable, params: Any, x: np.ndarray) -> np.ndarray:
    x, n = pad_to_multiple(x, self.dp)
    return np.asarray(fn(params, put_global(x, self.mesh)))[:n]

  def images(self, params: Any, x: np.ndarray) -> np.ndarray:
    """L2-normalised image embeddings [N, D] (float32, on host)."""
    return self._run(self._img, params, x)

  def texts(self, params: Any, tokens: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """L2-normalised text embeddings [N, D], computed in chunks of batch_size."""
    chunks = [self._run(self._txt, params, tokens[i:i + batch_size])
              for i in range(0, len(tokens), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


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
