"""ViT image tower: patch embedding, position embedding, pre-LN encoder, pooling."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vlp.config_errors import check_choice, fail
from big_vlp.models import common

# Errors name fields as they appear in a two-tower config.
PREFIX = "model.image"
POSEMBS = ("learn", "sincos2d")
POOL_TYPES = ("gap", "map", "tok")


def _patch_tuple(patch_size: Any) -> tuple[int, int]:
  """Accepts 16 or (16, 16); anything else is a config error."""
  if isinstance(patch_size, (int, np.integer)) and not isinstance(patch_size, bool):
    patch_size = (patch_size, patch_size)
  if (not isinstance(patch_size, (tuple, list)) or len(patch_size) != 2
      or not all(isinstance(p, (int, np.integer)) and p > 0 for p in patch_size)):
    fail(f"{PREFIX}.patch_size", patch_size,
         "must be a positive int or a pair of them; or set a variant like 'B/16'")
  return int(patch_size[0]), int(patch_size[1])


def _resize_posemb(pos: jnp.ndarray, gh: int, gw: int) -> jnp.ndarray:
  """A learned [1, n, W] position embedding on a square grid, bilinearly resized to a
  gh x gw grid when the image has another size than at init (e.g. SILC / DINO local crops
  through the same tower); unchanged when the grid matches."""
  n, width = pos.shape[1], pos.shape[2]
  if n == gh * gw:
    return pos
  side = int(round(n ** 0.5))
  if side * side != n:
    fail(f"{PREFIX}.posemb", "learn", f"the learned embedding has {n} positions, not a square "
         f"grid, so it cannot be resized to the {gh}x{gw} patches of this input")
  grid = pos.reshape(1, side, side, width)
  return jax.image.resize(grid, (1, gh, gw, width), "bilinear").reshape(1, gh * gw, width)


class ViT(nn.Module):
  """Vision Transformer; explicit size fields override those from `variant`."""
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: tuple[int, int] | int | None = None
  posemb: str = "learn"
  pool_type: str = "gap"
  dtype: str = "float32"
  dropout: float = 0.0
  # Optional Dense projection named `head` after pooling (TwoTower sets it from embed_dim).
  head_dim: int | None = None
  # Activation checkpointing per block: one of common.REMAT_POLICIES (True / False from old
  # configs mean "full" / "none"). `scan` runs the blocks as one nn.scan: params become
  # Transformer/encoderblock/... with a leading [depth] axis (common.stack_layers converts).
  remat: str | bool = "none"
  scan: bool = False
  # Operand dtype of the Dense / attention-projection matmuls (common.check_matmul_dtype):
  # 'bfloat16' rounds operands to bf16 and sums in float32 (models/matmul.py).
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, image: jnp.ndarray, *, train: bool = False, mask_ratio: float = 0.0,
               project_tokens: bool = False) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """image [B, H, W, C] -> (pooled [B, width or head_dim], aux with 'tokens' [B, N, width]).

    `mask_ratio` > 0 (FLIP) keeps a random `kept_tokens(N, mask_ratio)` of the N patches of
    each image (drawn from the 'mask' rng) and drops the rest before the encoder.
    `project_tokens` adds aux 'tokens_proj': every patch token through the `head`
    projection (token-wise similarity, FILIP).
    """
    size = common.resolve_size(
        self.variant, dict(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                           num_heads=self.num_heads, patch_size=self.patch_size), PREFIX)
    if "patch_size" not in size:
      fail(f"{PREFIX}.patch_size", None, "no value; set it or use a variant like 'B/16'")
    ph, pw = _patch_tuple(size["patch_size"])
    width = size["width"]
    check_choice(f"{PREFIX}.posemb", self.posemb, POSEMBS)
    check_choice(f"{PREFIX}.pool_type", self.pool_type, POOL_TYPES)
    common.check_dropout(self.dropout, f"{PREFIX}.dropout")
    dtype = common.resolve_dtype(self.dtype, f"{PREFIX}.dtype")
    remat = common.resolve_remat(self.remat, f"{PREFIX}.remat")
    scan = common.check_scan(self.scan, f"{PREFIX}.scan")
    mm = common.check_matmul_dtype(self.matmul_dtype, f"{PREFIX}.matmul_dtype")

    b, h, w, _ = image.shape
    if h % ph or w % pw:
      fail(f"{PREFIX}.patch_size", (ph, pw), f"must divide the image size {h}x{w}")
    gh, gw = h // ph, w // pw
    x = nn.Conv(width, (ph, pw), strides=(ph, pw), padding="VALID", dtype=dtype,
                param_dtype=jnp.float32, name="embedding")(image.astype(dtype))
    x = x.reshape(b, gh * gw, width)

    if self.posemb == "learn":
      if self.has_variable("params", "pos_embedding"):  # Its grid is the init image's.
        pos = _resize_posemb(self.get_variable("params", "pos_embedding"), gh, gw)
      else:
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=width ** -0.5),
                         (1, gh * gw, width), jnp.float32)
    else:
      if width % 4:
        fail(f"{PREFIX}.width", width, "posemb='sincos2d' needs a width divisible by 4")
      pos = common.posemb_sincos_2d(gh, gw, width)
    x = x + pos.astype(dtype)
    if mask_ratio:
      x = common.random_keep(x, common.kept_tokens(gh * gw, mask_ratio),
                             self.make_rng("mask"))

    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, width), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(dtype), [b, 1, 1]), x], axis=1)

    x = nn.Dropout(rate=self.dropout)(x, not train)
    x = common.Encoder(size["depth"], size["mlp_dim"], size["num_heads"], dtype,
                       self.dropout, remat, scan, mm, name="Transformer")(x, None, not train)

    # aux tokens are patch tokens only, so N is the patch count for every pool type.
    tokens = x[:, 1:] if self.pool_type == "tok" else x
    if self.pool_type == "gap":
      pooled = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(dtype)
    elif self.pool_type == "map":
      pooled = common.MAPHead(size["mlp_dim"], size["num_heads"], dtype, mm)(tokens)
    else:
      pooled = x[:, 0]

    aux = {"tokens": tokens, "pre_logits": pooled}
    return common.project(self.head_dim, dtype, pooled, aux, project_tokens, mm)
