"""Text transformer tower: token + learned position embedding, masked encoder, pooling."""

import flax.linen as nn
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

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, *, train: bool = False
               ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """tokens int [B, L] -> (pooled [B, width or head_dim], aux with 'tokens' [B, L, width])."""
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
    x = nn.Dropout(rate=self.dropout)(x, not train)

    real = tokens != self.pad_id  # [B, L]
    mask = real[:, None, None, :]
    if self.causal:
      mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    x = common.Encoder(size["depth"], size["mlp_dim"], size["num_heads"], dtype,
                       self.dropout, remat, scan, name="Transformer")(x, mask, not train)

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
      pooled = common.MAPHead(size["mlp_dim"], size["num_heads"], dtype)(x, real)

    aux = {"tokens": x, "pre_logits": pooled}
    if self.head_dim is not None:
      pooled = nn.Dense(self.head_dim, dtype=dtype, param_dtype=jnp.float32,
                        name="head")(pooled)
    return pooled, aux
