"""Text transformer tower: token + learned position embedding, masked encoder, pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vlp.config_errors import check_choice, fail
from big_vlp.models import common

PREFIX = "model.text"
POOL_TYPES = ("last", "first", "gap", "map")


class TextTransformer(nn.Module):
  """Text encoder whose pooled output ignores padding (tokens equal to `pad_id`)."""
  vocab_size: int
  max_len: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  pool_type: str = "last"
  causal: bool = False
  pad_id: int = 0
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
  def __call__(self, tokens: jnp.ndarray, *, train: bool = False, mask_ratio: float = 0.0,
               project_tokens: bool = False) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """tokens int [B, L] -> (pooled [B, width or head_dim], aux with 'tokens' [B, L', width]
    and 'mask' [B, L'], True for real tokens).

    `mask_ratio` > 0 (FLIP's text masking) keeps `kept_tokens(L, mask_ratio)` positions per
    text, dropping padding first and then random real tokens; kept tokens stay in order.
    `project_tokens` adds aux 'tokens_proj' (every token through the `head` projection).
    """
    size = common.resolve_size(
        self.variant, dict(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                           num_heads=self.num_heads), PREFIX)
    if "patch_size" in size:
      fail(f"{PREFIX}.variant", self.variant,
           "the text tower has no patches; use a size only, e.g. 'B'")
    width = size["width"]
    check_choice(f"{PREFIX}.pool_type", self.pool_type, POOL_TYPES)
    common.check_dropout(self.dropout, f"{PREFIX}.dropout")
    dtype = common.resolve_dtype(self.dtype, f"{PREFIX}.dtype")
    remat = common.resolve_remat(self.remat, f"{PREFIX}.remat")
    scan = common.check_scan(self.scan, f"{PREFIX}.scan")
    mm = common.check_matmul_dtype(self.matmul_dtype, f"{PREFIX}.matmul_dtype")
    b, length = tokens.shape
    if length > self.max_len:
      fail(f"{PREFIX}.max_len", self.max_len, f"shorter than the input length {length}")

    x = nn.Embed(self.vocab_size, width, dtype=dtype, param_dtype=jnp.float32,
                 embedding_init=nn.initializers.normal(stddev=width ** -0.5))(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=width ** -0.5),
                     (1, self.max_len, width), jnp.float32)
    # Absolute positions of real tokens don't depend on how much padding follows them,
    # which (with pads masked as keys) makes the pooled output padding-invariant.
    x = x + pos[:, :length].astype(dtype)
    real = tokens != self.pad_id  # [B, L]
    if mask_ratio:
      keep = common.kept_tokens(length, mask_ratio)
      # Padding scores above every real token, so it is dropped first (as FLIP does).
      order = jax.random.uniform(self.make_rng("mask"), real.shape) + jnp.where(real, 0., 2.)
      idx = jnp.sort(jnp.argsort(order, axis=1)[:, :keep], axis=1)
      x = jnp.take_along_axis(x, idx[..., None], axis=1)
      real = jnp.take_along_axis(real, idx, axis=1)
      length = keep
    x = nn.Dropout(rate=self.dropout)(x, not train)

    mask = real[:, None, None, :]
    if self.causal:
      mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    x = common.Encoder(size["depth"], size["mlp_dim"], size["num_heads"], dtype,
                       self.dropout, remat, scan, mm, name="Transformer")(x, mask, not train)

    if self.pool_type == "last":
      # Index of the last real token (EOS): the pipeline appends EOS before any padding.
      last = jnp.max(jnp.where(real, jnp.arange(length)[None], 0), axis=1)
      pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    elif self.pool_type == "first":
      pooled = x[:, 0]
    elif self.pool_type == "gap":
      weights = real.astype(jnp.float32)[..., None]
      total = jnp.sum(x.astype(jnp.float32) * weights, axis=1)
      pooled = (total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)).astype(dtype)
    else:
      pooled = common.MAPHead(size["mlp_dim"], size["num_heads"], dtype, mm)(x, real)

    aux = {"tokens": x, "mask": real, "pre_logits": pooled}
    return common.project(self.head_dim, dtype, pooled, aux, project_tokens, mm)
