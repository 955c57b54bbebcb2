"""Image<->text retrieval Recall@K over a held-out captioned split."""

from typing import Any

import numpy as np

from big_vlp.evaluators.common import Encoders, eval_batches


def recall_at_k(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
  """sim[i, j] = similarity of image i and text j, where text i describes image i."""
  n = sim.shape[0]
  diag = sim[np.arange(n), np.arange(n)]
  # Rank = number of candidates scoring strictly higher than the true match.
  i2t_rank = (sim > diag[:, None]).sum(axis=1)
  t2i_rank = (sim > diag[None, :]).sum(axis=0)
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
    out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
  return out


class Retrieval:
  """Evaluator: each image against every caption of the split and vice versa."""

  def __init__(self, name: str, cfg: Any, *, encoders: Encoders, tokenizer: Any,
               text_len: int, data: Any):
    self.name, self.cfg, self.encoders = name, cfg, encoders
    self.tokenizer, self.data = tokenizer, data

  def run(self, params: Any) -> dict[str, float]:
    """Returns i2t_r{1,5,10} and t2i_r{1,5,10}."""
    zimg, ztxt = [], []
    for b in eval_batches(self.data, self.cfg, self.tokenizer):
      zimg.append(self.encoders.images(params, b["image"]))
      ztxt.append(self.encoders.texts(params, b["text"]))
    zimg, ztxt = np.concatenate(zimg), np.concatenate(ztxt)
    return recall_at_k(zimg @ ztxt.T)
