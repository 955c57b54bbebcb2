"""DINO's projection head for SILC self-distillation: MLP, L2-normalise, prototype layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vlp.models import common

# Zero-norm guard of the L2 normalisations (torch.nn.functional.normalize's default).
_EPS = 1e-12


def unit_columns(kernel: jax.Array) -> jax.Array:
  """kernel [D, K] with every column scaled to unit L2 norm (weight norm, gain 1)."""
  norm = jnp.linalg.norm(kernel, axis=0, keepdims=True)
  return kernel / jnp.maximum(norm, _EPS)


class DinoHead(nn.Module):
  """Pooled features [..., W] -> prototype logits [..., num_prototypes] (float32).

  `num_layers` Dense layers (GELU between them; the last one maps to `bottleneck_dim`), an
  L2 normalisation, then a bias-free linear layer to the prototypes whose weight is
  weight-normalised with the gain fixed to 1, as DINO does by default (norm_last_layer): each
  prototype is a unit vector, so the logits are cosines in [-1, 1] and the temperatures
  alone set their sharpness. DINO found the learned gain made training unstable; without it
  the param `prototypes` only carries directions.
  """
  num_prototypes: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """x [..., W] -> logits [..., num_prototypes]."""
    if self.num_layers < 1:
      raise ValueError(f"DinoHead.num_layers must be >= 1, got {self.num_layers}")
    dtype = common.resolve_dtype(self.dtype, "dtype")
    # DINO's init: truncated normal (std 0.02) weights, zero biases.
    dense = lambda n, i: nn.Dense(n, dtype=dtype, param_dtype=jnp.float32,
                                  kernel_init=nn.initializers.truncated_normal(0.02),
                                  name=f"mlp_{i}")
    for i in range(self.num_layers - 1):
      x = nn.gelu(dense(self.hidden_dim, i)(x), approximate=False)  # Exact GELU, as DINO.
    x = dense(self.bottleneck_dim, self.num_layers - 1)(x).astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)
    prototypes = self.param("prototypes", nn.initializers.lecun_normal(),
                            (self.bottleneck_dim, self.num_prototypes), jnp.float32)
    # Default matmul precision (bfloat16 passes on TPU), as DINO ran this layer under AMP;
    # HIGHEST would cost several times the FLOPs of a [B, D] x [D, 65536] product.
    return jnp.matmul(x, unit_columns(prototypes))
