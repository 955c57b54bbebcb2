"""Zero-shot classification: class embedding = renormalised mean of prompt embeddings.

With config.similarity='filip', an image's score for a class is instead the mean over the
prompt templates of the FILIP similarity 0.5 * (s_i2t + s_t2i) to that class's prompt.
With `scoring='likelihood'` (the default for a model without a text tower, as CapPa scores
it) it is the mean over the templates of log p(prompt | image) under the captioning decoder.
"""

from typing import Any

import numpy as np

from big_vlp.config_errors import check_choice, fail
from big_vlp.evaluators.common import Encoders, eval_batches, filip_scores

# evals.<name>.scoring: 'auto' is 'likelihood' for a model without a text tower, else
# 'embedding' (pooled or FILIP similarity, as config.similarity says).
SCORINGS = ("auto", "embedding", "likelihood")

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


def resolve_scoring(name: str, cfg: Any, encoders: Any) -> str:
  """evals.<name>.scoring checked against the model, 'auto' resolved."""
  field = f"evals.{name}.scoring"
  scoring = check_choice(field, cfg.get("scoring", "auto"), SCORINGS)
  # Stand-in encoders (tests) that say nothing about the model have a text tower only.
  has_text = getattr(encoders, "has_text_tower", True)
  has_decoder = getattr(encoders, "decoder", None) is not None
  if scoring == "auto":
    scoring = "embedding" if has_text else "likelihood"
  if scoring == "likelihood" and not has_decoder:
    fail(field, "likelihood", "scores prompts by their likelihood under the captioning "
         "decoder, but the model has none (model.decoder is unset); use 'embedding'")
  if scoring == "embedding" and not has_text:
    fail(field, "embedding", "the model has no text tower (model.text=None) to embed the "
         "prompts; use 'likelihood' or 'auto'")
  return scoring


def likelihood_class_scores(logprobs: np.ndarray, num_classes: int) -> np.ndarray:
  """[B, C] mean over templates of log p(prompt | image), from class-major [B, C * T]."""
  return logprobs.reshape(len(logprobs), num_classes, -1).mean(axis=2)


class ZeroShot:
  """Evaluator: classify images by the nearest class-prompt embedding, or by the most
  likely class prompts under the captioning decoder (scoring='likelihood')."""

  def __init__(self, name: str, cfg: Any, *, encoders: Encoders, tokenizer: Any,
               text_len: int, data: Any, similarity: str = "pooled"):
    self.name, self.cfg, self.encoders = name, cfg, encoders
    self.similarity = similarity
    self.tokenizer, self.text_len, self.data = tokenizer, text_len, data
    self.scoring = resolve_scoring(name, cfg, encoders)
    self.label_key = cfg.get("label_key", "label")
    self.class_names = list(cfg.get("class_names", None) or
                            data.class_names(cfg.data, cfg.get("data_dir"), key=self.label_key))
    self.templates = tuple(cfg.get("templates", None) or DEFAULT_TEMPLATES)
    self._prompt_tokens = None

  def run(self, params: Any) -> dict[str, float]:
    """Returns {'top1', 'top5', 'mean_per_class_recall'}."""
    if self.scoring == "likelihood":
      return self._run_likelihood(params)
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

  def prompt_tokens(self) -> np.ndarray:
    """int32 [C * T, L]: every class's prompts (class-major), at the decoder's length."""
    if self._prompt_tokens is None:
      prompts = [t.format(c) for c in self.class_names for t in self.templates]
      max_len = int(self.encoders.decoder["max_len"])
      self._prompt_tokens = self.tokenizer.encode(prompts, max_len)
    return self._prompt_tokens

  def likelihood_scores(self, params: Any, images: np.ndarray) -> np.ndarray:
    """[B, C]: per image, the mean over templates of log p(class prompt | image)."""
    logprobs = self.encoders.text_logprobs(params, images, self.prompt_tokens(),
                                           rows=int(self.cfg.batch_size))
    return likelihood_class_scores(logprobs, len(self.class_names))

  def _run_likelihood(self, params: Any) -> dict[str, float]:
    """CapPa's zero-shot: each image's class is the one whose prompts are most likely."""
    logits, labels = [], []
    for b in eval_batches(self.data, self.cfg, self.tokenizer):
      logits.append(self.likelihood_scores(params, b["image"]))
      labels.append(b[self.label_key])
    return topk_metrics(np.concatenate(logits), np.concatenate(labels).astype(np.int64),
                        len(self.class_names))
