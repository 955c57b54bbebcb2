"""Zero-shot classification: class embedding = renormalised mean of prompt embeddings.

With config.similarity='filip', an image's score for a class is instead the mean over the
prompt templates of the FILIP similarity 0.5 * (s_i2t + s_t2i) to that class's prompt.
"""

from typing import Any

import numpy as np

from big_vlp.evaluators.common import Encoders, eval_batches, filip_scores

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a {}.",
)


def class_embeddings(encoders: Encoders, params: Any, tokenizer: Any, class_names: list[str],
                     templates: tuple[str, ...], max_len: int) -> np.ndarray:
  """[C, D] unit-norm class embeddings averaged over the prompt templates."""
  prompts = [t.format(c) for c in class_names for t in templates]
  z = encoders.texts(params, tokenizer.encode(prompts, max_len))
  z = z.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def class_prompt_tokens(encoders: Encoders, params: Any, tokenizer: Any,
                        class_names: list[str], templates: tuple[str, ...], max_len: int
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Token embeddings [C * T, L, D] and mask of every prompt, class-major."""
  prompts = [t.format(c) for c in class_names for t in templates]
  return encoders.text_tokens(params, tokenizer.encode(prompts, max_len))


def filip_class_scores(img_tok: np.ndarray, prompt_tok: np.ndarray, prompt_mask: np.ndarray,
                       num_classes: int) -> np.ndarray:
  """[B, C] mean over templates of the symmetric FILIP similarity to each class's prompts."""
  s_i2t, s_t2i = filip_scores(img_tok, prompt_tok, prompt_mask)
  sym = 0.5 * (s_i2t + s_t2i)
  return sym.reshape(len(img_tok), num_classes, -1).mean(axis=2)


def topk_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
  """top1, top5 and mean per-class recall (fractions in [0, 1])."""
  order = np.argsort(-logits, axis=1)
  hit1 = order[:, 0] == labels
  k = min(5, num_classes)
  hit5 = (order[:, :k] == labels[:, None]).any(axis=1)
  recalls = [hit1[labels == c].mean() for c in range(num_classes) if (labels == c).any()]
  return {"top1": float(hit1.mean()), "top5": float(hit5.mean()),
          "mean_per_class_recall": float(np.mean(recalls))}


class ZeroShot:
  """Evaluator: classify images by the nearest class-prompt embedding."""

  def __init__(self, name: str, cfg: Any, *, encoders: Encoders, tokenizer: Any,
               text_len: int, data: Any, similarity: str = "pooled"):
    self.name, self.cfg, self.encoders = name, cfg, encoders
    self.similarity = similarity
    self.tokenizer, self.text_len, self.data = tokenizer, text_len, data
    self.label_key = cfg.get("label_key", "label")
    self.class_names = list(cfg.get("class_names", None) or
                            data.class_names(cfg.data, cfg.get("data_dir"), key=self.label_key))
    self.templates = tuple(cfg.get("templates", None) or DEFAULT_TEMPLATES)

  def run(self, params: Any) -> dict[str, float]:
    """Returns {'top1', 'top5', 'mean_per_class_recall'}."""
    if self.similarity == "filip":
      return self._run_filip(params)
    zcls = class_embeddings(self.encoders, params, self.tokenizer, self.class_names,
                            self.templates, self.text_len)
    logits, labels = [], []
    for b in eval_batches(self.data, self.cfg, self.tokenizer):
      logits.append(self.encoders.images(params, b["image"]) @ zcls.T)
      labels.append(b[self.label_key])
    return topk_metrics(np.concatenate(logits), np.concatenate(labels).astype(np.int64),
                        len(self.class_names))

  def _run_filip(self, params: Any) -> dict[str, float]:
    """FILIP scores of each image against every class's prompts."""
    prompt_tok, prompt_mask = class_prompt_tokens(
        self.encoders, params, self.tokenizer, self.class_names, self.templates,
        self.text_len)
    logits, labels = [], []
    for b in eval_batches(self.data, self.cfg, self.tokenizer):
      img_tok = self.encoders.image_tokens(params, b["image"])
      logits.append(filip_class_scores(img_tok, prompt_tok, prompt_mask,
                                       len(self.class_names)))
      labels.append(b[self.label_key])
    return topk_metrics(np.concatenate(logits), np.concatenate(labels).astype(np.int64),
                        len(self.class_names))
