"""Two-tower (CLIP / SigLIP) model: image tower, text tower, temperature and bias.

Optional parts make it the model of the other recipes: a text `decoder` cross-attending to
the image tokens (CoCa with the text tower; CapPa with `text=None`, an image tower and a
decoder only) and a DINO head `dino` on the pooled image features (SILC).
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vlp.config_errors import fail
from big_vlp.models import common
from big_vlp.models.decoder import TextDecoder, shift_right
from big_vlp.models.dino_head import DinoHead
from big_vlp.models.text import TextTransformer
from big_vlp.models.vit import ViT


def l2_normalize(x: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
  """Normalises the last axis in float32; eps keeps an all-zero vector finite."""
  x = x.astype(jnp.float32)
  return x * jnp.reciprocal(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps))


def _tower_kwargs(cls: type, kwargs: Mapping[str, Any] | None, prefix: str) -> dict[str, Any]:
  """Copies tower kwargs, rejecting unknown keys with the allowed ones listed."""
  kwargs = dict(kwargs or {})
  allowed = [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
  for key in kwargs:
    if key not in allowed:
      fail(f"{prefix}.{key}", kwargs[key], "unknown option; allowed: " + ", ".join(allowed))
  return kwargs


def _out_dim(kwargs: Mapping[str, Any], prefix: str) -> int:
  """Width of a tower's pooled output, computed from its kwargs without building it."""
  if kwargs.get("head_dim") is not None:
    return kwargs["head_dim"]
  size = common.resolve_size(kwargs.get("variant"),
                             {k: kwargs.get(k) for k in common.SIZE_KEYS}, prefix)
  return size["width"]


class TwoTower(nn.Module):
  """Image tower `img` + text tower `txt` + log-scale `t` and bias `b` params; optionally a
  captioning decoder `dec` and a SILC DINO head `dino` (see the module docstring)."""
  image: Mapping[str, Any]
  text: Mapping[str, Any] | None
  embed_dim: int | None = None
  temperature_init: float = math.log(10.0)
  bias_init: float | None = -10.0
  max_scale: float | None = None
  decoder: Mapping[str, Any] | None = None
  dino: Mapping[str, Any] | None = None

  def setup(self) -> None:
    """Builds towers (adding `head` projections when embed_dim is set) and scalar params."""
    image = _tower_kwargs(ViT, self.image, "model.image")
    text = None if self.text is None else _tower_kwargs(TextTransformer, self.text,
                                                         "model.text")
    if self.embed_dim is not None:
      if not isinstance(self.embed_dim, int) or self.embed_dim <= 0:
        fail("model.embed_dim", self.embed_dim, "must be a positive integer or None")
      for kwargs, prefix in ((image, "model.image"), (text, "model.text")):
        if kwargs is None:
          continue
        if kwargs.get("head_dim") not in (None, self.embed_dim):
          fail(f"{prefix}.head_dim", kwargs["head_dim"],
               f"conflicts with model.embed_dim={self.embed_dim}; leave it unset")
        kwargs["head_dim"] = self.embed_dim
    elif text is not None:
      img_dim, txt_dim = _out_dim(image, "model.image"), _out_dim(text, "model.text")
      if img_dim != txt_dim:
        fail("model.embed_dim", None,
             f"image output width {img_dim} != text output width {txt_dim}; set "
             "model.embed_dim to project both towers to a common size")
    if self.max_scale is not None and not self.max_scale > 0:
      fail("model.max_scale", self.max_scale, "must be positive or None")
    if text is None and self.decoder is None:
      fail("model.text", None, "a model without a text tower needs model.decoder (CapPa)")

    self.img = ViT(**image)
    self.txt = None if text is None else TextTransformer(**text)
    self.dec = (None if self.decoder is None else
                TextDecoder(**_tower_kwargs(TextDecoder, self.decoder, "model.decoder")))
    self.dino_head = (None if self.dino is None else
                      DinoHead(**_tower_kwargs(DinoHead, self.dino, "silc.head")))
    self.t = self.param("t", nn.initializers.constant(self.temperature_init), (), jnp.float32)
    if self.bias_init is None:
      self.b = None
    else:
      self.b = self.param("b", nn.initializers.constant(self.bias_init), (), jnp.float32)

  def _text_tower(self) -> TextTransformer:
    if self.txt is None:
      raise ValueError("this model has no text tower (model.text=None, a CapPa captioner); "
                       "score texts by their likelihood under the decoder instead")
    return self.txt

  def encode_image(self, image: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """image [B, H, W, C] -> L2-normalised float32 embeddings [B, D]."""
    zimg, _ = self.img(image, train=train)
    return l2_normalize(zimg)

  def encode_text(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """tokens int [B, L] -> L2-normalised float32 embeddings [B, D]."""
    ztxt, _ = self._text_tower()(tokens, train=train)
    return l2_normalize(ztxt)

  def encode_image_tokens(self, image: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """image [B, H, W, C] -> every patch token projected and L2-normalised [B, N, D]."""
    _, aux = self.img(image, train=train, project_tokens=True)
    return l2_normalize(aux["tokens_proj"])

  def encode_text_tokens(self, tokens: jnp.ndarray, train: bool = False
                         ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """tokens int [B, L] -> (every token projected, L2-normalised [B, L, D]; real [B, L])."""
    _, aux = self._text_tower()(tokens, train=train, project_tokens=True)
    return l2_normalize(aux["tokens_proj"]), aux["mask"]

  def image_context(self, image: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """image [B, H, W, C] -> the image tower's output tokens [B, N, W] the decoder attends."""
    _, aux = self.img(image, train=train)
    return aux["tokens"]

  def caption_logits(self, tokens: jnp.ndarray, context: jnp.ndarray, train: bool = False,
                     parallel: jnp.ndarray | bool | None = None) -> jnp.ndarray:
    """Decoder logits float32 [B, L, V] for decoder inputs `tokens` (BOS-shifted, see
    models.decoder.shift_right) over image tokens `context` [B, N, W]."""
    if self.dec is None:
      raise ValueError("this model has no captioning decoder (model.decoder is unset)")
    return self.dec(tokens, context, train=train, parallel=parallel)

  def dino_logits(self, image: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """image [B, H, W, C] (any size the patches divide) -> DINO prototype logits [B, K]
    from the image tower's pooled features before its `head` projection (SILC)."""
    if self.dino_head is None:
      raise ValueError("this model has no DINO head (config.silc.weight is 0)")
    _, aux = self.img(image, train=train)
    return self.dino_head(aux["pre_logits"])

  def init_all(self, image: jnp.ndarray, tokens: jnp.ndarray) -> Any:
    """Touches every sub-module once, so model.init(..., method='init_all') creates every
    param (the decoder and DINO head are not always on the __call__ path)."""
    out = self(image, tokens, caption=self.dec is not None)
    if self.dino_head is not None:
      out = (out, self.dino_logits(image))
    return out

  def __call__(self, image: jnp.ndarray, tokens: jnp.ndarray, train: bool = False, *,
               locked: tuple[str, ...] = (), image_mask: float = 0.0,
               text_mask: float = 0.0, token_outputs: bool = False, caption: bool = False,
               parallel: jnp.ndarray | None = None
               ) -> tuple[jnp.ndarray, jnp.ndarray | None, dict[str, Any]]:
    """Returns (zimg, ztxt, {'t', 'scale', 'bias'}); scale = exp(t), clamped by max_scale.

    Training options of the recipes: towers named in `locked` ('img', 'txt'; LiT) run in
    inference mode and pass no gradient back; `image_mask` / `text_mask` drop that fraction
    of tokens when training (FLIP; ignored when not training); `token_outputs` adds
    'img_tokens' [B, N, D], 'txt_tokens' [B, L, D] (projected, L2-normalised per token) and
    'txt_mask' [B, L] to the dict (FILIP). `caption` adds 'caption_logits' [B, L, V]: the
    decoder teacher-forced on `tokens` (inputs shifted right behind BOS = pad), attending to
    the image tower's tokens of this same forward pass; `parallel` (bool [B]) marks CapPa's
    parallel-prediction rows. Without a text tower, ztxt is None.
    """
    out = dict(self.scale_bias())
    towers = {}
    for name, tower, x, ratio in (("img", self.img, image, image_mask),
                                  ("txt", self.txt, tokens, text_mask)):
      if tower is None:
        towers[name] = (None, {})
        continue
      on = train and name not in locked
      pooled, aux = tower(x, train=on, mask_ratio=ratio if train else 0.0,
                          project_tokens=token_outputs)
      if name in locked:
        pooled, aux = jax.lax.stop_gradient((pooled, aux))
      towers[name] = (l2_normalize(pooled), aux)
    (zimg, img_aux), (ztxt, txt_aux) = towers["img"], towers["txt"]
    if token_outputs:
      out.update(img_tokens=l2_normalize(img_aux["tokens_proj"]),
                 txt_tokens=l2_normalize(txt_aux["tokens_proj"]), txt_mask=txt_aux["mask"])
    if caption:
      dec = self.dec
      out["caption_logits"] = self.caption_logits(
          shift_right(tokens, dec.pad_id), img_aux["tokens"], train=train, parallel=parallel)
    return zimg, ztxt, out

  def scale_bias(self) -> dict[str, Any]:
    """{'t', 'scale', 'bias'}: the loss's learned scalars, without running the towers."""
    t = self.t
    log_scale = t if self.max_scale is None else jnp.minimum(t, math.log(self.max_scale))
    return {"t": t, "scale": jnp.exp(log_scale), "bias": self.b}
