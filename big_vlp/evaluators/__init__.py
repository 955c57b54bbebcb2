"""Evaluators declared in config.evals, each run every `every` steps and at the end."""

from typing import Any

from big_vlp.config_errors import check_choice
from big_vlp.evaluators.captioning import Captioning
from big_vlp.evaluators.common import Encoders, similarity_of
from big_vlp.evaluators.retrieval import Retrieval
from big_vlp.evaluators.zeroshot import ZeroShot

EVALUATORS = {"zeroshot": ZeroShot, "retrieval": Retrieval, "captioning": Captioning}


def build_evaluators(config: Any, model: Any, tokenizer: Any, mesh: Any) -> dict[str, Any]:
  """Instantiates every evaluator in config.evals (name -> evaluator).

  config.similarity picks how they score image-text pairs: 'pooled' (default; cosine of the
  pooled embeddings) or 'filip' (token-wise late interaction of the token embeddings).
  """
  from big_vlp.data import pipeline as data  # Here: tensorflow loads only when needed.
  similarity = similarity_of(config)
  encoders = Encoders(model, mesh)
  # Prompt / caption length of the text tower, or of the decoder when there is none (CapPa).
  text_cfg = config.model.get("text") or config.model.get("decoder")
  text_len = int(text_cfg.max_len)
  out = {}
  for name, cfg in (config.get("evals") or {}).items():
    kind = check_choice(f"evals.{name}.type", cfg.get("type", name), EVALUATORS)
    out[name] = EVALUATORS[kind](name, cfg, encoders=encoders, tokenizer=tokenizer,
                                 text_len=text_len, data=data, similarity=similarity)
  return out
