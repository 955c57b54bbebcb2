"""Model FLOPs of a two-tower train step, counted analytically from the config.

MFU counts model FLOPs: the matmuls the model needs (2*M*K*N each), not what the compiler
runs (rematerialised forward passes, elementwise ops), so remat, scan or accumulation never
change it. Training is forward + backward, the backward being two matmuls per forward one
(gradients w.r.t. inputs and weights), except the patch embedding, whose input (the image)
needs no gradient. tests/test_flops.py checks the count against XLA's cost analysis of the
compiled step.

The optional parts of the model count too: the captioning decoder (CoCa; CapPa without a
text tower), and SILC's student on the local crops with its DINO head (trained) and EMA
teacher on the global crops. The teacher runs forward only, but it is part of the model's
computation each step (as LiT's locked tower is), so its forward pass counts as model FLOPs.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

from big_vlp.models import common
from big_vlp.models.dino_head import DinoHead
from big_vlp.models.vit import _patch_tuple


class StepFlops(NamedTuple):
  """Model FLOPs per example (forward, by part) and per train step."""
  image_fwd: float
  text_fwd: float  # 0 without a text tower (CapPa).
  loss_fwd: float  # The contrastive loss; 0 without a text tower.
  patch_embed_fwd: float  # Part of image_fwd; its backward has no input gradient.
  batch: int
  locked: tuple[str, ...] = ()  # Towers ('img', 'txt') run forward only (LiT).
  decoder_fwd: float = 0.0  # Captioning decoder on the caption (CoCa / CapPa), trained.
  # Part of decoder_fwd reading the image tokens (image_proj, cross-attention keys and
  # values): no input gradient when the image tower is locked.
  decoder_context_fwd: float = 0.0
  # SILC student: the image tower (up to the pooled features) + DINO head on the local crops.
  silc_fwd: float = 0.0
  silc_patch_embed_fwd: float = 0.0  # Part of silc_fwd.
  # DINO's cross-entropy over (global, local) view pairs, a [G, K] x [K, L] product per
  # example; its backward is one matmul (the teacher side needs no gradient).
  silc_loss_fwd: float = 0.0
  # SILC's EMA teacher (image tower + DINO head) on the global crops: forward only.
  teacher_fwd: float = 0.0

  @property
  def forward_per_example(self) -> float:
    """Forward FLOPs of one example (image-text pair and its crops), losses included."""
    return (self.image_fwd + self.text_fwd + self.loss_fwd + self.decoder_fwd + self.silc_fwd
            + self.silc_loss_fwd + self.teacher_fwd)

  @property
  def train_per_example(self) -> float:
    """Forward + backward FLOPs of one example (a locked tower, the teacher: forward only)."""
    img = self.image_fwd if "img" in self.locked else 3 * self.image_fwd - self.patch_embed_fwd
    txt = self.text_fwd if "txt" in self.locked else 3 * self.text_fwd
    dec = 3 * self.decoder_fwd - (self.decoder_context_fwd if "img" in self.locked else 0.0)
    silc = 3 * self.silc_fwd - self.silc_patch_embed_fwd + 2 * self.silc_loss_fwd
    return img + txt + 3 * self.loss_fwd + dec + silc + self.teacher_fwd

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


def _image_parts(kwargs: Mapping[str, Any], height: int, width_px: int, channels: int,
                 head_dim: int | None, mask: float, token_outputs: bool, pooled: bool = True
                 ) -> tuple[float, float]:
  """(forward FLOPs, of which patch embedding) of the ViT on one image: the encoder, then
  (if `pooled`) the pooling and a `head_dim` projection (none when None)."""
  size = tower_size(kwargs, "model.image")
  ph, pw = _patch_tuple(size["patch_size"])
  d, patches = size["width"], (height // ph) * (width_px // pw)
  embed = 2 * patches * ph * pw * channels * d
  patches = common.kept_tokens(patches, mask)
  pool = kwargs.get("pool_type", "gap")
  tokens = patches + (1 if pool == "tok" else 0)
  total = embed + encoder_fwd(tokens, d, size["depth"], size["mlp_dim"])
  if pooled and pool == "map":
    total += map_head_fwd(patches, d, size["mlp_dim"])
  if pooled and head_dim is not None:
    total += 2 * d * head_dim * (1 + (patches if token_outputs else 0))
  return float(total), float(embed)


def image_fwd(kwargs: Mapping[str, Any], height: int, width_px: int, channels: int = 3,
              head_dim: int | None = None, mask: float = 0.0,
              token_outputs: bool = False) -> tuple[float, float]:
  """(forward FLOPs, of which patch embedding) of the ViT tower on one image, with a
  fraction `mask` of the patches dropped after the embedding (FLIP)."""
  head_dim = head_dim if head_dim is not None else kwargs.get("head_dim")
  return _image_parts(kwargs, height, width_px, channels, head_dim, mask, token_outputs)


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


def decoder_fwd(kwargs: Mapping[str, Any], length: int, image_tokens: int, image_width: int,
                vocab_size: int | None = None) -> tuple[float, float]:
  """(forward FLOPs, of which on the image tokens) of the captioning decoder
  (models.decoder.TextDecoder kwargs) on one caption of `length` tokens attending to
  `image_tokens` tokens of width `image_width`.

  Per block: causal self-attention (computed over the full [L, L]), cross-attention (queries
  and output on the caption, keys and values on the image tokens) and the MLP; then the
  [L, D] x [D, V] logits (tied or not). The token embedding is a lookup, no matmul.
  `vocab_size` is used when the kwargs have none (the model builder takes the tokenizer's).
  """
  size = tower_size(kwargs, "model.decoder")
  d, depth = size["width"], size["depth"]
  vocab = kwargs.get("vocab_size") or vocab_size
  if not vocab:
    raise ValueError("the decoder's vocabulary size is unknown: set model.decoder.vocab_size "
                     "or pass vocab_size (the tokenizer's)")
  n = image_tokens
  context = 2 * n * image_width * d if image_width != d else 0  # image_proj
  context += depth * 2 * 2 * n * d * d  # Cross-attention keys, values.
  cross = 2 * 2 * length * d * d + 2 * 2 * length * n * d  # q, out; logits, probs.v
  blocks = encoder_fwd(length, d, depth, size["mlp_dim"]) + depth * cross
  logits = 2 * length * d * vocab
  return float(context + blocks + logits), float(context)


def dino_head_fwd(kwargs: Mapping[str, Any] | None, width: int) -> float:
  """Forward FLOPs of the SILC DINO head (models.dino_head.DinoHead kwargs, its defaults for
  missing ones) on one pooled feature vector of `width`: the MLP, then the prototypes."""
  kwargs = dict(kwargs or {})
  get = lambda key: int(kwargs.get(key) or getattr(DinoHead, key))
  layers, hidden = get("num_layers"), get("hidden_dim")
  bottleneck, prototypes = get("bottleneck_dim"), get("num_prototypes")
  dims = [width] + [hidden] * (layers - 1) + [bottleneck]
  mlp = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))
  return float(mlp + 2 * bottleneck * prototypes)


def _crops(shape: tuple[int, ...], name: str) -> tuple[int, int, int, int]:
  """(views, H, W, C) of a per-example crop stack shape [V, H, W] or [V, H, W, C]."""
  if len(shape) not in (3, 4):
    raise ValueError(f"{name} must be [views, H, W, C] per example, got {tuple(shape)}")
  return (int(shape[0]), int(shape[1]), int(shape[2]),
          int(shape[3]) if len(shape) > 3 else 3)


def two_tower_flops(model: Mapping[str, Any], image_shape: tuple[int, ...], text_len: int,
                    batch: int, phase: Any = None, similarity: str = "pooled", *,
                    vocab_size: int | None = None, silc: Mapping[str, Any] | None = None,
                    local_shape: tuple[int, ...] | None = None,
                    global_shape: tuple[int, ...] | None = None) -> StepFlops:
  """Model FLOPs of a train step of config.model on images [H, W, C] and `text_len` tokens,
  in a recipe `phase` (big_vlp.recipes.Phase: masked tokens, locked towers).

  The contrastive loss compares every image with every text of the global batch: one
  [B, E] x [E, B] matmul, 2*B*E FLOPs per example; FILIP compares every patch with every
  text token: 2*B*N*L*E.

  model.decoder (when set) is trained on every step: teacher-forced over the `text_len`
  caption tokens, cross-attending to the image tower's output tokens (those FLIP kept);
  `vocab_size` is its vocabulary when model.decoder.vocab_size is unset. Without a text
  tower (model.text None, CapPa) there is no text tower and no contrastive loss, and the
  image tower's pooling and `head` projection are not counted (no loss reads them).

  `silc` (config.silc.head, the DINO head kwargs; None: SILC off) adds SILC: the student
  image tower (trained, up to its pooled features) and DINO head on the local crops
  `local_shape` [L, h, w, C] of each example, the DINO loss over the G x L view pairs, and
  the EMA teacher's image tower + DINO head on the global crops `global_shape` [G, H, W, C]
  (None: the image itself, G = 1). The teacher runs forward only, with no backward pass,
  and that forward pass counts as model FLOPs.
  """
  image = dict(model["image"])
  text = None if model.get("text") is None else dict(model["text"])
  embed_dim = model.get("embed_dim")
  h, w = int(image_shape[0]), int(image_shape[1])
  c = int(image_shape[2]) if len(image_shape) > 2 else 3
  image_mask = phase.image_mask if phase is not None else 0.0
  text_mask = phase.text_mask if phase is not None else 0.0
  locked = tuple(phase.locked) if phase is not None else ()
  filip = similarity == "filip"
  img_size = tower_size(image, "model.image")
  ph, pw = _patch_tuple(img_size["patch_size"])
  patches = common.kept_tokens((h // ph) * (w // pw), image_mask)
  img_head = embed_dim if embed_dim is not None else image.get("head_dim")
  img, patch_embed = _image_parts(image, h, w, c, img_head, image_mask, filip,
                                  pooled=text is not None)
  txt = loss = 0.0
  if text is not None:
    txt = text_fwd(text, text_len, embed_dim, text_mask, filip)
    out_dim = embed_dim if embed_dim is not None else img_size["width"]
    loss = 2 * batch * out_dim
    if filip:
      loss *= patches * common.kept_tokens(text_len, text_mask)

  dec = dec_context = 0.0
  if model.get("decoder") is not None:
    dec, dec_context = decoder_fwd(model["decoder"], text_len, patches, img_size["width"],
                                   vocab_size)

  student = student_embed = dino_loss = teacher = 0.0
  if silc is not None:
    if local_shape is None:
      raise ValueError("SILC needs the local crops' shape, local_shape=[L, h, w, C]")
    head = dino_head_fwd(silc, img_size["width"])
    views, lh, lw, lc = _crops(local_shape, "local_shape")
    tower, student_embed = _image_parts(image, lh, lw, lc, None, 0.0, False)
    student, student_embed = views * (tower + head), views * student_embed
    globals_ = _crops(global_shape, "global_shape") if global_shape is not None else (
        1, h, w, c)
    tower, _ = _image_parts(image, *globals_[1:], None, 0.0, False)
    teacher = globals_[0] * (tower + head)
    prototypes = int(dict(silc).get("num_prototypes") or DinoHead.num_prototypes)
    dino_loss = 2 * globals_[0] * views * prototypes
  return StepFlops(img, float(txt), float(loss), patch_embed, int(batch), locked,
                   dec, dec_context, float(student), float(student_embed), float(dino_loss),
                   float(teacher))
