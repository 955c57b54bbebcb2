"""Captioning: decode a caption for every image of a split and score it against the split's
reference captions (exact match, corpus BLEU-4, CIDEr-D; see caption_metrics).

Config (evals.<name>): type 'captioning', data, split, data_dir, pp (must keep 'image' and
the reference captions `caption_key`, default 'caption': one string or several per
example), batch_size, every, decode ('greedy' or 'beam'), beam_size (4), length_penalty
(0.6), max_len (default: the decoder's), num_examples_shown (captions printed per run, 0).
"""

from typing import Any

import jax
import numpy as np

from big_vlp.config_errors import check_choice, fail
from big_vlp.evaluators.caption_metrics import caption_metrics
from big_vlp.evaluators.common import Encoders, eval_batches

DECODE_METHODS = ("greedy", "beam")


def _text(value: Any) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def reference_sets(captions: Any) -> list[list[str]]:
  """Reference captions per example from a batch's caption feature: [B] strings (one each)
  or [B, K] (several; empty strings, e.g. padding, are dropped)."""
  out = []
  for row in captions:
    if isinstance(row, (bytes, str)):
      refs = [_text(row)]
    else:
      refs = [_text(r) for r in np.asarray(row, object).reshape(-1)]
      refs = [r for r in refs if r.strip()]
    out.append(refs or [""])
  return out


class Captioning:
  """Evaluator: generated captions vs reference captions -> {exact_match, bleu4, cider}."""

  def __init__(self, name: str, cfg: Any, *, encoders: Encoders, tokenizer: Any,
               text_len: int, data: Any, similarity: str = "pooled"):
    del text_len, similarity  # Captions are decoded, not embedded.
    self.name, self.cfg, self.encoders = name, cfg, encoders
    self.tokenizer, self.data = tokenizer, data
    decoder = getattr(encoders, "decoder", None)
    if decoder is None:
      fail(f"evals.{name}.type", cfg.get("type", name), "captions images with the model's "
           "captioning decoder, but the model has none (model.decoder is unset)")
    prefix = f"evals.{name}"
    self.method = check_choice(f"{prefix}.decode", cfg.get("decode", "greedy"),
                               DECODE_METHODS)
    self.caption_key = cfg.get("caption_key", "caption")
    dec_len = int(decoder["max_len"])
    self.max_len = int(cfg.get("max_len", None) or dec_len)
    if not 1 <= self.max_len <= dec_len:
      fail(f"{prefix}.max_len", cfg.get("max_len"),
           f"must be in [1, {dec_len}] (model.decoder.max_len)")
    self.beam_size = int(cfg.get("beam_size", 4))
    if self.beam_size < 1:
      fail(f"{prefix}.beam_size", self.beam_size, "must be >= 1")
    self.length_penalty = float(cfg.get("length_penalty", 0.6))
    if self.length_penalty < 0:
      fail(f"{prefix}.length_penalty", self.length_penalty, "must be >= 0")
    self.num_shown = int(cfg.get("num_examples_shown", 0) or 0)
    pad_id = encoders.decoder_pad_id
    if pad_id != tokenizer.pad_id:
      fail("model.decoder.pad_id", pad_id,
           f"the tokenizer pads with {tokenizer.pad_id}; set model.decoder.pad_id to it")

  def captions(self, params: Any) -> tuple[list[str], list[list[str]]]:
    """(generated caption per image, its reference captions) over the whole split."""
    hyps, refs = [], []
    for b in eval_batches(self.data, self.cfg, self.tokenizer):
      if self.caption_key not in b:
        fail(f"evals.{self.name}.caption_key", self.caption_key,
             f"not in the pre-processed examples (keys: {', '.join(sorted(b))}); keep it "
             f"in evals.{self.name}.pp")
      ids = self.encoders.captions(
          params, b["image"], eos_id=self.tokenizer.eos_id, max_len=self.max_len,
          method=self.method, beam_size=self.beam_size, length_penalty=self.length_penalty,
          rows=int(self.cfg.batch_size))
      hyps.extend(self.tokenizer.decode(row) for row in ids)
      refs.extend(reference_sets(b[self.caption_key]))
    return hyps, refs

  def run(self, params: Any) -> dict[str, float]:
    """Returns {'exact_match', 'bleu4' (fractions in [0, 1]), 'cider' (CIDEr-D, x10)}."""
    hyps, refs = self.captions(params)
    shown = self.num_shown if jax.process_index() == 0 else 0
    for hyp, ref in list(zip(hyps, refs))[:shown]:
      print(f"[{self.name}] {hyp!r}  (reference: {ref[0]!r})", flush=True)
    return caption_metrics(hyps, refs)
