"""Captioning text decoder (CapPa / CoCa-style): causal self-attention, cross-attention to
image tokens, and CapPa's parallel prediction rows (all-mask inputs, no causal mask)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vlp.config_errors import fail
from big_vlp.models import common
from big_vlp.models.layernorm import LayerNorm

PREFIX = "model.decoder"


def shift_right(tokens: jnp.ndarray, bos_id: int) -> jnp.ndarray:
  """Teacher-forcing inputs [B, L]: BOS, then tokens[:, :-1]; the targets are `tokens`."""
  bos = jnp.full(tokens.shape[:1] + (1,), bos_id, tokens.dtype)
  return jnp.concatenate([bos, tokens[:, :-1]], axis=1)


def sample_parallel(rng: jax.Array, batch: int, prob: float) -> jnp.ndarray:
  """bool [B]: each row independently True with probability `prob` (CapPa's
  masked_pred_prob, 0.75 in its pretraining config), i.e. trained by parallel prediction."""
  return jax.random.uniform(rng, (batch,)) < prob


def self_attention_mask(tokens: jnp.ndarray, pad_id: int,
                        parallel: jnp.ndarray | None) -> jnp.ndarray:
  """bool [B, 1, L, L], True where a query may attend a key.

  Ordinary rows: causal, and padding inputs are masked as keys except position 0, which
  always holds BOS (the tokenizers have no BOS id, so BOS may well equal pad_id, as in
  big_vision). Parallel rows: every position attends every position. Their inputs are all
  the same mask token, so padding carries no information; masking it would tell each
  position the caption's length.
  """
  length = tokens.shape[1]
  real = (tokens != pad_id) | (jnp.arange(length) == 0)[None]
  mask = jnp.tril(jnp.ones((length, length), bool))[None] & real[:, None, :]
  if parallel is not None:
    mask = mask | parallel[:, None, None]
  return mask[:, None]


class DecoderBlock(nn.Module):
  """Pre-LN decoder block: x + SelfAttn(LN(x)), x + CrossAttn(LN(x), image), x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, image_tokens: jnp.ndarray, mask: jnp.ndarray,
               deterministic: bool = True) -> jnp.ndarray:
    """x [B, L, D], image_tokens [B, N, D], mask as from self_attention_mask -> [B, L, D]."""
    def norm(name: str) -> LayerNorm:
      return LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name=name)

    def drop(y: jnp.ndarray) -> jnp.ndarray:
      return nn.Dropout(rate=self.dropout)(y, deterministic)

    def attention(name: str) -> nn.MultiHeadDotProductAttention:
      # The towers' attention settings, under an explicit name (self vs cross).
      return common._attention(self.num_heads, self.dtype).clone(parent=self, name=name)

    x = common.constrain(x, "batch", None, None)
    y = norm("LayerNorm_self")(x)
    y = attention("SelfAttention")(y, y, mask=mask, deterministic=deterministic)
    x = x + drop(y)
    y = norm("LayerNorm_cross")(x)
    y = attention("CrossAttention")(y, image_tokens, deterministic=deterministic)
    x = x + drop(y)
    y = norm("LayerNorm_mlp")(x)
    # Auto-named MlpBlock_0, so the tower sharding rules for MLPs cover it.
    y = common.MlpBlock(self.mlp_dim, self.dtype, self.dropout)(y, deterministic)
    return common.constrain(x + drop(y), "batch", None, None)


class TextDecoder(nn.Module):
  """Autoregressive text decoder over image tokens; returns float32 logits [B, L, V]."""
  vocab_size: int
  max_len: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  pad_id: int = 0
  # Output projection = the transposed token embedding (no separate `logits` Dense).
  tie_embedding: bool = False
  dtype: str = "float32"
  dropout: float = 0.0
  # Activation checkpointing per block: one of common.REMAT_POLICIES (or True / False).
  remat: str | bool = "none"

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, image_tokens: jnp.ndarray, *, train: bool = False,
               parallel: jnp.ndarray | bool | None = None) -> jnp.ndarray:
    """tokens int [B, L] (decoder inputs, e.g. shift_right(targets)), image_tokens
    [B, N, W_img] -> logits float32 [B, L, vocab_size].

    `parallel` (bool [B], or one bool for every row): True rows are CapPa parallel
    prediction: their inputs are replaced by the learned mask embedding at every position
    and their self-attention is unmasked; other rows are causal teacher forcing.
    """
    size = common.resolve_size(
        self.variant, dict(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                           num_heads=self.num_heads), PREFIX)
    if "patch_size" in size:
      fail(f"{PREFIX}.variant", self.variant,
           "the decoder has no patches; use a size only, e.g. 'B'")
    width = size["width"]
    common.check_dropout(self.dropout, f"{PREFIX}.dropout")
    dtype = common.resolve_dtype(self.dtype, f"{PREFIX}.dtype")
    remat = common.resolve_remat(self.remat, f"{PREFIX}.remat")
    b, length = tokens.shape
    if length > self.max_len:
      fail(f"{PREFIX}.max_len", self.max_len, f"shorter than the input length {length}")
    if image_tokens.ndim != 3 or image_tokens.shape[0] != b:
      raise ValueError(f"image_tokens must be [B={b}, N, W], got {image_tokens.shape}")

    if parallel is None or (isinstance(parallel, (bool, np.bool_)) and not parallel):
      parallel = None
    else:
      parallel = jnp.broadcast_to(jnp.asarray(parallel, bool), (b,))

    embed = nn.Embed(self.vocab_size, width, dtype=dtype, param_dtype=jnp.float32,
                     embedding_init=nn.initializers.normal(stddev=width ** -0.5))
    x = embed(tokens)
    # Created whether or not this call uses it, so the param tree never depends on `parallel`.
    mask_emb = self.param("mask_embedding", nn.initializers.normal(stddev=width ** -0.5),
                          (1, 1, width), jnp.float32)
    if parallel is not None:
      x = jnp.where(parallel[:, None, None], mask_emb.astype(dtype), x)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=width ** -0.5),
                     (1, self.max_len, width), jnp.float32)
    x = x + pos[:, :length].astype(dtype)
    x = nn.Dropout(rate=self.dropout)(x, not train)

    image_tokens = image_tokens.astype(dtype)
    if image_tokens.shape[-1] != width:
      image_tokens = nn.Dense(width, dtype=dtype, param_dtype=jnp.float32,
                              name="image_proj")(image_tokens)

    mask = self_attention_mask(tokens, self.pad_id, parallel)
    block_cls = DecoderBlock
    if remat != "none":
      # argnum 4 is `deterministic` (self is 0), which must stay a Python bool.
      block_cls = nn.remat(DecoderBlock, policy=common._REMAT_FNS[remat], static_argnums=(4,))
    for i in range(size["depth"]):
      x = block_cls(size["mlp_dim"], size["num_heads"], dtype, self.dropout,
                    name=f"decoderblock_{i}")(x, image_tokens, mask, not train)
    x = LayerNorm(dtype=dtype, param_dtype=jnp.float32, name="decoder_norm")(x)

    if self.tie_embedding:
      logits = embed.attend(x)
    else:
      # Zero init (as big_vision's CapPa): every caption starts at loss log(V).
      logits = nn.Dense(self.vocab_size, dtype=dtype, param_dtype=jnp.float32,
                        kernel_init=nn.initializers.zeros, name="logits")(x)
    return logits.astype(jnp.float32)
