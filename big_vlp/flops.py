"""Model FLOPs of a two-tower train step, counted analytically from the config.

MFU counts model FLOPs: the matmuls the model needs (2*M*K*N each), not what the compiler
runs (rematerialised forward passes, elementwise ops), so remat, scan or accumulation never
change it. Training is forward + backward, the backward being two matmuls per forward one
(gradients w.r.t. inputs and weights), except the patch embedding, whose input (the image)
needs no gradient. tests/test_flops.py checks the count against XLA's cost analysis of the
compiled step.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

from big_vlp.models import common
from big_vlp.models.vit import _patch_tuple


class StepFlops(NamedTuple):
  """Model FLOPs per example (forward, by part) and per train step."""
  image_fwd: float
  text_fwd: float
  loss_fwd: float
  patch_embed_fwd: float  # Part of image_fwd; its backward has no input gradient.
  batch: int
  locked: tuple[str, ...] = ()  # Towers ('img', 'txt') run forward only (LiT).

  @property
  def forward_per_example(self) -> float:
    """Forward FLOPs of one image-text pair, loss included."""
    return self.image_fwd + self.text_fwd + self.loss_fwd

  @property
  def train_per_example(self) -> float:
    """Forward + backward FLOPs of one pair (a locked tower: forward only)."""
    img = self.image_fwd if "img" in self.locked else 3 * self.image_fwd - self.patch_embed_fwd
    txt = self.text_fwd if "txt" in self.locked else 3 * self.text_fwd
    return img + txt + 3 * self.loss_fwd

  @property
  def train_per_step(self) -> float:
    """Forward + backward FLOPs of one step on the global batch."""
    return self.train_per_example * self.batch


def encoder_fwd(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward FLOPs of `depth` pre-LN transformer blocks on one sequence of `tokens`."""
  projections = 4 * 2 * tokens * width * width  # q, k, v, out
  attention = 2 * 2 * tokens * tokens * width  # q.k logits, then probs.v
  mlp = 2 * 2 * tokens * width * mlp_dim
  return depth * (projections + attention + mlp)


def map_head_fwd(tokens: int, width: int, mlp_dim: int) -> float:
  """Forward FLOPs of attention pooling: one probe query over `tokens`, then an MLP."""
  projections = 2 * width * width * 2 + 2 * 2 * tokens * width * width  # q, out; k, v
  attention = 2 * 2 * tokens * width
  return projections + attention + 2 * 2 * width * mlp_dim


def tower_size(kwargs: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """A tower's width / depth / mlp_dim / num_heads (+ patch_size) from variant and fields."""
  return common.resolve_size(kwargs.get("variant"),
                             {k: kwargs.get(k) for k in common.SIZE_KEYS + ("patch_size",)},
                             prefix)


def image_fwd(kwargs: Mapping[str, Any], height: int, width_px: int, channels: int = 3,
              head_dim: int | None = None, mask: float = 0.0,
              token_outputs: bool = False) -> tuple[float, float]:
  """(forward FLOPs, of which patch embedding) of the ViT tower on one image, with a
  fraction `mask` of the patches dropped after the embedding (FLIP)."""
  size = tower_size(kwargs, "model.image")
  ph, pw = _patch_tuple(size["patch_size"])
  d, patches = size["width"], (height // ph) * (width_px // pw)
  embed = 2 * patches * ph * pw * channels * d
  patches = common.kept_tokens(patches, mask)
  pool = kwargs.get("pool_type", "gap")
  tokens = patches + (1 if pool == "tok" else 0)
  total = embed + encoder_fwd(tokens, d, size["depth"], size["mlp_dim"])
  if pool == "map":
    total += map_head_fwd(patches, d, size["mlp_dim"])
  head_dim = head_dim if head_dim is not None else kwargs.get("head_dim")
  if head_dim is not None:
    total += 2 * d * head_dim * (1 + (patches if token_outputs else 0))
  return float(total), float(embed)


def text_fwd(kwargs: Mapping[str, Any], length: int, head_dim: int | None = None,
             mask: float = 0.0, token_outputs: bool = False) -> float:
  """Forward FLOPs of the text tower on one sequence (the embedding lookup is no matmul)."""
  size = tower_size(kwargs, "model.text")
  d = size["width"]
  length = common.kept_tokens(length, mask)
  total = encoder_fwd(length, d, size["depth"], size["mlp_dim"])
  if kwargs.get("pool_type", "last") == "map":
    total += map_head_fwd(length, d, size["mlp_dim"])
  head_dim = head_dim if head_dim is not None else kwargs.get("head_dim")
  if head_dim is not None:
    total += 2 * d * head_dim * (1 + (length if token_outputs else 0))
  return float(total)


def two_tower_flops(model: Mapping[str, Any], image_shape: tuple[int, ...], text_len: int,
                    batch: int, phase: Any = None, similarity: str = "pooled") -> StepFlops:
  """Model FLOPs of a train step of config.model on images [H, W, C] and `text_len` tokens,
  in a recipe `phase` (big_vlp.recipes.Phase: masked tokens, locked towers).

  The contrastive loss compares every image with every text of the global batch: one
  [B, E] x [E, B] matmul, 2*B*E FLOPs per example; FILIP compares every patch with every
  text token: 2*B*N*L*E.
  """
  image, text = dict(model["image"]), dict(model["text"])
  embed_dim = model.get("embed_dim")
  h, w = int(image_shape[0]), int(image_shape[1])
  c = int(image_shape[2]) if len(image_shape) > 2 else 3
  image_mask = phase.image_mask if phase is not None else 0.0
  text_mask = phase.text_mask if phase is not None else 0.0
  filip = similarity == "filip"
  img, patch_embed = image_fwd(image, h, w, c, embed_dim, image_mask, filip)
  txt = text_fwd(text, text_len, embed_dim, text_mask, filip)
  out_dim = embed_dim if embed_dim is not None else tower_size(image, "model.image")["width"]
  loss = 2 * batch * out_dim
  if filip:
    ph, pw = _patch_tuple(tower_size(image, "model.image")["patch_size"])
    patches = common.kept_tokens((h // ph) * (w // pw), image_mask)
    loss *= patches * common.kept_tokens(text_len, text_mask)
  return StepFlops(img, txt, float(loss), patch_embed, int(batch),
                   tuple(phase.locked) if phase is not None else ())
