"""Shared model parts: the ViT size grid, variant strings, encoder blocks, MAP head, posembs."""

import re
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vlp.config_errors import ConfigError, check_choice, fail
from big_vlp.models.attention import make_attention_fn
from big_vlp.models.layernorm import LayerNorm
from big_vlp.models.matmul import MATMUL_DTYPES, dense_dot_general

# width / depth / mlp_dim / num_heads, as in the ViT, SigLIP and ViT-g papers.
SIZES: dict[str, dict[str, int]] = {
    "mu": dict(width=32, depth=1, mlp_dim=128, num_heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
}

SIZE_KEYS = ("width", "depth", "mlp_dim", "num_heads")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# What each EncoderBlock keeps for the backward pass; the rest is recomputed.
#   none: keep every activation (fastest, most memory).
#   full: keep only the block's input and recompute the whole block.
#   dots: keep every matmul output (incl. attention logits / weighted values).
#   dots_no_batch: keep matmul outputs without batch dims (the Dense projections and MLP,
#     not the per-example attention einsums), so the O(N^2) attention maps are recomputed.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
_REMAT_FNS: dict[str, Callable[..., bool]] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# Name of the scanned block's params; unscanned blocks are `{_BLOCK}_{i}`.
_BLOCK = "encoderblock"
_BLOCK_RE = re.compile(rf"{_BLOCK}_(\d+)")


def _variant_help() -> str:
  return ("expected 'SIZE' or 'SIZE/PATCH' (e.g. 'B' or 'B/16'); allowed sizes: "
          + ", ".join(SIZES))


def decode_variant(variant: str | None, field: str = "model.image.variant") -> dict[str, Any]:
  """Turns 'B/16' into width/depth/mlp_dim/num_heads (+ patch_size); None gives {}."""
  if variant is None:
    return {}
  if not isinstance(variant, str):
    fail(field, variant, "not a string; " + _variant_help())
  size, sep, patch = variant.partition("/")
  if size not in SIZES:
    fail(field, variant, f"unknown size {size!r}; " + _variant_help())
  out: dict[str, Any] = dict(SIZES[size])
  if sep:
    if not (patch.isascii() and patch.isdigit()) or int(patch) <= 0:
      fail(field, variant, f"malformed patch size {patch!r}; " + _variant_help())
    out["patch_size"] = (int(patch), int(patch))
  return out


def resolve_size(variant: str | None, overrides: Mapping[str, Any],
                 prefix: str) -> dict[str, Any]:
  """Merges a variant with explicit overrides (which win) and checks the result is usable."""
  merged = decode_variant(variant, f"{prefix}.variant")
  merged.update({k: v for k, v in overrides.items() if v is not None})
  for key in SIZE_KEYS:
    if key not in merged:
      fail(f"{prefix}.{key}", None,
           f"no value and no variant to take it from; set {prefix}.variant ("
           + _variant_help() + f") or {prefix}.{key}")
    value = merged[key]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
      fail(f"{prefix}.{key}", value, "must be a positive integer")
  if merged["width"] % merged["num_heads"]:
    fail(f"{prefix}.num_heads", merged["num_heads"],
         f"must divide {prefix}.width={merged['width']}")
  return merged


def resolve_dtype(name: str, field: str) -> Any:
  """Maps a config dtype name to the jnp dtype used for computation."""
  check_choice(field, name, DTYPES)
  return DTYPES[name]


def check_matmul_dtype(name: str, field: str) -> str:
  """A tower's matmul_dtype: 'float32', or 'bfloat16' (operands rounded, float32 sums)."""
  return check_choice(field, name, MATMUL_DTYPES)


def resolve_remat(value: str | bool, field: str) -> str:
  """Normalises a remat setting to one of REMAT_POLICIES (old configs used True / False)."""
  if isinstance(value, (bool, np.bool_)):
    return "full" if value else "none"
  return check_choice(field, value, REMAT_POLICIES)


def check_scan(value: Any, field: str) -> bool:
  """`scan` must be a real bool: it changes the param tree, so a truthy string is a typo."""
  if not isinstance(value, (bool, np.bool_)):
    fail(field, value, "must be True or False")
  return bool(value)


def check_dropout(value: float, field: str) -> None:
  """Dropout must be a rate in [0, 1)."""
  if not 0.0 <= value < 1.0:
    fail(field, value, "must be in [0, 1)")


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0,
                     dtype: Any = jnp.float32) -> jnp.ndarray:
  """Fixed 2-D sin-cos position embedding [1, h*w, width], row-major over the grid."""
  if width % 4:
    raise ConfigError(f"sincos2d position embedding needs a width divisible by 4, got {width}")
  # Quarter of the channels each for sin(x), cos(x), sin(y), cos(y) (MoCo v3 / big_vision
  # layout), frequencies geometric from 1 down to 1/temperature.
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ang_x = xs.reshape(-1, 1) * omega[None]
  ang_y = ys.reshape(-1, 1) * omega[None]
  pe = np.concatenate([np.sin(ang_x), np.cos(ang_x), np.sin(ang_y), np.cos(ang_y)], axis=1)
  return jnp.asarray(pe[None], dtype)


# Logical activation dimensions -> mesh axes (the train step's mesh; see big_vlp.sharding).
ACTIVATION_AXES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"), "mlp": ("tensor",), "heads": ("tensor",)}


def constrain(x: jnp.ndarray, *names: str | None) -> jnp.ndarray:
  """Pins an activation's sharding (one logical name or None per dim) on the mesh in context.

  Without it GSPMD may resolve the clash between batch-split activations and width-split
  (FSDP) weights by gathering the batch, which multiplies activation memory by the device
  count. The train step sets the mesh (jax.sharding.use_abstract_mesh); elsewhere (eval,
  tests) this is a no-op. An axis that does not divide its dimension is left out.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = []
  for dim, name in zip(x.shape, names):
    axes = tuple(a for a in ACTIVATION_AXES.get(name, ()) if a in mesh.axis_names
                 and mesh.shape[a] > 1) if name else ()
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    spec.append(axes if axes and dim % size == 0 else None)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def kept_tokens(n: int, mask_ratio: float) -> int:
  """Tokens kept of `n` when a fraction `mask_ratio` is dropped (FLIP; at least one)."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio {mask_ratio} is not in [0, 1)")
  return max(1, int(n * (1.0 - mask_ratio)))


def random_keep(x: jnp.ndarray, keep: int, rng: jax.Array) -> jnp.ndarray:
  """x [B, N, W] -> [B, keep, W]: a uniformly random subset of each row's N tokens."""
  noise = jax.random.uniform(rng, x.shape[:2])
  idx = jnp.argsort(noise, axis=1)[:, :keep]
  return jnp.take_along_axis(x, idx[..., None], axis=1)


def project(head_dim: int | None, dtype: Any, pooled: jnp.ndarray, aux: dict[str, Any],
            project_tokens: bool, matmul_dtype: str = "float32"
            ) -> tuple[jnp.ndarray, dict[str, Any]]:
  """Applies a tower's optional `head` Dense to the pooled output (and to every token when
  asked), inside the calling module's scope."""
  if head_dim is None:
    if project_tokens:
      aux["tokens_proj"] = aux["tokens"]
    return pooled, aux
  head = nn.Dense(head_dim, dtype=dtype, param_dtype=jnp.float32,
                  dot_general=dense_dot_general(matmul_dtype), name="head")
  if project_tokens:
    aux["tokens_proj"] = head(aux["tokens"])
  return head(pooled), aux


class MlpBlock(nn.Module):
  """Two-layer GELU MLP used inside every transformer block."""
  mlp_dim: int
  dtype: Any = jnp.float32
  dropout: float = 0.0
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    """Applies Dense -> GELU -> Dropout -> Dense."""
    width = x.shape[-1]
    dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,
                               dot_general=dense_dot_general(self.matmul_dtype),
                               kernel_init=nn.initializers.xavier_uniform(),
                               bias_init=nn.initializers.normal(stddev=1e-6))
    x = dense(self.mlp_dim)(x)
    x = constrain(nn.gelu(x), "batch", None, "mlp")  # Hidden units split under tensor par.
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return dense(width)(x)


def _attention_fn(matmul_dtype: str) -> Callable[..., jnp.ndarray] | None:
  """The attention core for a tower's matmul_dtype; None: flax's einsum core.

  On the CPU, and wherever the attention dots take bfloat16 operands, the core is
  models/attention.py (a layout and backward pass XLA:CPU runs faster); elsewhere it is
  flax's einsum core, which accelerator compilers lay out well themselves.
  """
  if MATMUL_DTYPES[matmul_dtype] is not None or jax.default_backend() == "cpu":
    return make_attention_fn(MATMUL_DTYPES[matmul_dtype])
  return None


def _attention(num_heads: int, dtype: Any, matmul_dtype: str = "float32"
               ) -> nn.MultiHeadDotProductAttention:
  # Softmax in float32 so bfloat16 runs keep masked logits far below real ones. No dropout
  # on attention probabilities: blocks drop the attention output instead, as ViT does.
  # matmul_dtype reaches the q/k/v and output projections and the score and weighted-value
  # dots (see _attention_fn for the core).
  dot = dense_dot_general(matmul_dtype)
  core = _attention_fn(matmul_dtype)
  extra = {} if core is None else {"attention_fn": core}
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.initializers.xavier_uniform(), force_fp32_for_softmax=True,
      qkv_dot_general=dot, out_dot_general=dot, **extra)


class _Projection(nn.Module):
  """The kernel [D, H, hd] and bias [H, hd] of one of the query / key / value DenseGenerals
  of `_attention`, created as flax creates them (initialised on the flattened [D, H*hd]
  shape, same names, so the same random streams) and returned without being applied."""
  features: tuple[int, int]

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    n = int(np.prod(self.features))
    xavier, zeros = nn.initializers.xavier_uniform(), nn.initializers.zeros_init()
    kernel = self.param(
        "kernel", lambda rng, shape, dtype: xavier(rng, (in_features, n), dtype).reshape(shape),
        (in_features, *self.features), jnp.float32)
    bias = self.param("bias", lambda rng, shape, dtype: zeros(rng, (n,), dtype).reshape(shape),
                      self.features, jnp.float32)
    return kernel, bias


class SelfAttention(nn.Module):
  """`_attention(...)(x, x)` with the same params (names, shapes, initial values), but the
  query, key and value projections computed as one matmul against the three kernels
  stacked to [D, H, 3, hd], as open_clip's fused in-projection does.

  One [B*L, D] x [D, 3D] matmul (and one each for its input and weight gradients) instead
  of three [B*L, D] x [D, D] ones: at ViT-S/16 widths XLA:CPU's kernels run the D x D
  shapes at about two thirds of the speed of the wider one. The stacking axis sits after
  the heads axis, so tensor parallelism over heads shards the stacked kernel as it shards
  the three.
  """
  num_heads: int
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """x: [B, N, D]; mask: bool, broadcastable to [B, H, N, N], True = may attend."""
    width, heads = x.shape[-1], self.num_heads
    if width % heads:
      raise ValueError(f"width {width} is not divisible by num_heads {heads}")
    params = [_Projection((heads, width // heads), name=n)(width)
              for n in ("query", "key", "value")]
    kernel = jnp.stack([k for k, _ in params], axis=2)              # [D, H, 3, hd]
    bias = jnp.stack([b for _, b in params], axis=1)                # [H, 3, hd]
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    dot = dense_dot_general(self.matmul_dtype) or jax.lax.dot_general
    qkv = dot(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias  # [B, N, H, 3, hd]
    q, k, v = (qkv[..., i, :] for i in range(3))
    core = _attention_fn(self.matmul_dtype)
    if core is None:
      y = nn.dot_product_attention(q, k, v, mask=mask, dtype=self.dtype,
                                   force_fp32_for_softmax=True)
    else:
      y = core(q, k, v, mask=mask, dtype=self.dtype)
    return nn.DenseGeneral(
        features=width, axis=(-2, -1), kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros_init(), dtype=self.dtype, param_dtype=jnp.float32,
        dot_general=dense_dot_general(self.matmul_dtype), name="out")(y)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  dropout: float = 0.0
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None,
               deterministic: bool = True) -> jnp.ndarray:
    """x: [B, N, D]; mask: bool [B, 1|H, N, N], True where a query may attend a key."""
    x = constrain(x, "batch", None, None)
    y = LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
    # Named as flax names an unnamed MultiHeadDotProductAttention: same param tree.
    y = SelfAttention(self.num_heads, self.dtype, self.matmul_dtype,
                      name="MultiHeadDotProductAttention_0")(y, mask)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + y
    y = LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = MlpBlock(self.mlp_dim, self.dtype, self.dropout, self.matmul_dtype)(y, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return constrain(x + y, "batch", None, None)


class Encoder(nn.Module):
  """`depth` EncoderBlocks then a final LayerNorm.

  Unscanned, blocks are `encoderblock_0..depth-1`; with `scan=True` they are one
  `encoderblock` whose params carry a leading [depth] axis (see stack_layers).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  dropout: float = 0.0
  # One of REMAT_POLICIES; True / False are accepted for old configs ("full" / "none").
  remat: str | bool = "none"
  scan: bool = False
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None,
               deterministic: bool = True) -> jnp.ndarray:
    """x: [B, N, D] -> [B, N, D]; mask as in EncoderBlock."""
    remat = resolve_remat(self.remat, "remat")
    block_cls = EncoderBlock
    if remat != "none":
      # `self` is argnum 0, so 3 is `deterministic`, which must stay a Python bool. Inside
      # scan the loop boundary already stops XLA from merging the recomputation with the
      # forward pass, so the extra CSE barriers would only cost speed.
      block_cls = nn.remat(EncoderBlock, policy=_REMAT_FNS[remat], static_argnums=(3,),
                           prevent_cse=not self.scan)
    if self.scan:
      def body(block: nn.Module, carry: jnp.ndarray, layer_mask: jnp.ndarray | None
               ) -> tuple[jnp.ndarray, None]:
        return block(carry, layer_mask, deterministic), None

      # One compiled block for all layers: compile time and program size stop growing
      # with depth. Each layer gets its own params and dropout rng; the mask is shared.
      scanned = nn.scan(body, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=nn.broadcast, length=self.depth)
      block = block_cls(self.mlp_dim, self.num_heads, self.dtype, self.dropout,
                        self.matmul_dtype, name=_BLOCK)
      x, _ = scanned(block, x, mask)
    else:
      for i in range(self.depth):
        x = block_cls(self.mlp_dim, self.num_heads, self.dtype, self.dropout,
                      self.matmul_dtype, name=f"{_BLOCK}_{i}")(x, mask, deterministic)
    return LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="encoder_norm")(x)


def _layer_count(tree: Mapping[str, Any]) -> int:
  """Number of per-layer blocks in a dict, checking they are encoderblock_0..n-1."""
  found = sorted(int(m.group(1)) for k in tree if (m := _BLOCK_RE.fullmatch(str(k))))
  if found != list(range(len(found))):
    raise ValueError(f"per-layer blocks must be {_BLOCK}_0..{_BLOCK}_{{n-1}}, got indices "
                     f"{found}")
  if found and _BLOCK in tree:
    raise ValueError(f"both {_BLOCK!r} and {_BLOCK}_i keys in one dict: mixed layouts")
  return len(found)


def stack_layers(params: Any) -> Any:
  """Per-layer params (encoderblock_i) -> scanned layout (encoderblock, leading [depth] axis)."""
  if not isinstance(params, Mapping):
    return params
  n = _layer_count(params)
  out = {k: stack_layers(v) for k, v in params.items() if not _BLOCK_RE.fullmatch(str(k))}
  if n:
    blocks = [params[f"{_BLOCK}_{i}"] for i in range(n)]
    out[_BLOCK] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
  return out


def unstack_layers(params: Any) -> Any:
  """Scanned layout (encoderblock with leading [depth] axis) -> per-layer encoderblock_i."""
  if not isinstance(params, Mapping):
    return params
  _layer_count(params)  # Rejects a dict holding both layouts.
  out = {k: unstack_layers(v) for k, v in params.items() if k != _BLOCK}
  if _BLOCK in params:
    stacked = params[_BLOCK]
    depths = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    if len(depths) != 1:
      raise ValueError(f"{_BLOCK!r} leaves disagree on the layer count: {sorted(depths)}")
    for i in range(depths.pop()):
      out[f"{_BLOCK}_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
  return out


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends over tokens, then LN + MLP."""
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """x: [B, N, D], mask: bool [B, N] (True = real token) -> [B, D]."""
    b, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
    probe = jnp.tile(probe, [b, 1, 1]).astype(self.dtype)
    attn_mask = None if mask is None else mask[:, None, None, :]
    x = _attention(self.num_heads, self.dtype, self.matmul_dtype)(probe, x, mask=attn_mask)
    y = LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
    x = x + MlpBlock(self.mlp_dim, self.dtype, matmul_dtype=self.matmul_dtype)(y)
    return x[:, 0]
