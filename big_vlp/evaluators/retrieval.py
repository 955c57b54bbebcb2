"""Image<->text retrieval Recall@K over a held-out captioned split."""

from typing import Any

import numpy as np

from big_vlp.evaluators.common import Encoders, eval_batches, filip_scores


def recall_at_k(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10),
                sim_t2i: np.ndarray | None = None) -> dict[str, float]:
  """sim[i, j] = similarity of image i and text j, where text i describes image i.

  Image->text recall ranks each row of `sim`; text->image recall ranks each column of
  `sim_t2i` when given (FILIP scores the two directions differently), else of `sim`.
  """
  n = sim.shape[0]
  if sim_t2i is None:
    sim_t2i = sim
  idx = np.arange(n)
  # Rank = number of candidates scoring strictly higher than the true match.
  i2t_rank = (sim > sim[idx, idx][:, None]).sum(axis=1)
  t2i_rank = (sim_t2i > sim_t2i[idx, idx][None, :]).sum(axis=0)
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
    out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
  return out


class Retrieval:
  """Evaluator: each image against every caption of the split and vice versa."""

  def __init__(self, name: str, cfg: Any, *, encoders: Encoders, tokenizer: Any,
               text_len: int, data: Any, similarity: str = "pooled"):
    self.name, self.cfg, self.encoders = name, cfg, encoders
    self.tokenizer, self.data, self.similarity = tokenizer, data, similarity

  def run(self, params: Any) -> dict[str, float]:
    """Returns i2t_r{1,5,10} and t2i_r{1,5,10}."""
    if self.similarity == "filip":
      return self._run_filip(params)
    zimg, ztxt = [], []
    for b in eval_batches(self.data, self.cfg, self.tokenizer):
      zimg.append(self.encoders.images(params, b["image"]))
      ztxt.append(self.encoders.texts(params, b["text"]))
    zimg, ztxt = np.concatenate(zimg), np.concatenate(ztxt)
    return recall_at_k(zimg @ ztxt.T)

  def _run_filip(self, params: Any) -> dict[str, float]:
    """FILIP: texts ranked by s_i2t for each image, images by s_t2i for each text."""
    img_tok, txt_tok, txt_mask = [], [], []
    for b in eval_batches(self.data, self.cfg, self.tokenizer):
      img_tok.append(self.encoders.image_tokens(params, b["image"]))
      tok, mask = self.encoders.text_tokens(params, b["text"])
      txt_tok.append(tok)
      txt_mask.append(mask)
    s_i2t, s_t2i = filip_scores(np.concatenate(img_tok), np.concatenate(txt_tok),
                                np.concatenate(txt_mask))
    return recall_at_k(s_i2t, sim_t2i=s_t2i)
