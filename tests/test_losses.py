"""Losses against an independent NumPy implementation and the reference's worked values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vlp import losses
from big_vlp.config_errors import ConfigError


def np_softmax_loss(x, y, s):
  """CLIP loss written out with explicit loops over rows and columns."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  logits = s * x @ y.T
  n = len(x)
  rows = [math.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(n)]
  cols = [math.log(np.exp(logits[:, j]).sum()) - logits[j, j] for j in range(n)]
  return 0.5 * (np.mean(rows) + np.mean(cols))


def np_sigmoid_loss(x, y, s, b):
  """SigLIP loss as a double sum over pairs."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = len(x)
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      l = s * float(x[i] @ y[j]) + b
      total += -math.log(1.0 / (1.0 + math.exp(-z * l)))
  return total / n


def _normed(rng, n, d):
  v = rng.normal(size=(n, d))
  return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_worked_values_from_reference():
  eye = jnp.eye(16, dtype=jnp.float32)
  sig = losses.sigmoid_loss(eye, eye, jnp.float32(10.0), jnp.float32(-10.0))
  np.testing.assert_allclose(sig, math.log(2) + 15 * math.log1p(math.exp(-10)), atol=1e-6)
  np.testing.assert_allclose(sig, 0.6938282, atol=1e-6)
  soft = losses.softmax_loss(eye, eye, jnp.float32(1.0))
  np.testing.assert_allclose(soft, math.log(math.e + 15) - 1, atol=1e-6)
  np.testing.assert_allclose(soft, 1.874597, atol=1e-6)


def test_sigmoid_at_siglip_init_near_orthogonal():
  rng = np.random.default_rng(0)
  x, y = _normed(rng, 32, 4096), _normed(rng, 32, 4096)
  val = losses.sigmoid_loss(x, y, jnp.float32(10.0), jnp.float32(-10.0))
  # Positives are ~orthogonal too, so each row costs ~log(1+e^10); negatives ~0.
  np.testing.assert_allclose(val, math.log1p(math.exp(10)), atol=0.2)


@pytest.mark.parametrize("n,d,s,b", [(8, 16, 10.0, -10.0), (5, 3, 2.5, 0.3), (1, 4, 1.0, 0.0)])
def test_losses_match_numpy(n, d, s, b):
  rng = np.random.default_rng(n * 31 + d)
  x, y = _normed(rng, n, d), _normed(rng, n, d)
  np.testing.assert_allclose(losses.sigmoid_loss(x, y, s, b), np_sigmoid_loss(x, y, s, b),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.softmax_loss(x, y, s), np_softmax_loss(x, y, s),
                             rtol=1e-5)


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(3)
  x, y = _normed(rng, 6, 5).astype(np.float64), _normed(rng, 6, 5).astype(np.float64)
  with jax.enable_x64(True):
    g = jax.grad(lambda s, b: losses.sigmoid_loss(x, y, s, b), argnums=(0, 1))(3.0, -2.0)
    eps = 1e-6
    fd_s = (np_sigmoid_loss(x, y, 3 + eps, -2) - np_sigmoid_loss(x, y, 3 - eps, -2)) / (2 * eps)
    fd_b = (np_sigmoid_loss(x, y, 3, -2 + eps) - np_sigmoid_loss(x, y, 3, -2 - eps)) / (2 * eps)
    np.testing.assert_allclose(g, (fd_s, fd_b), rtol=1e-5)
    gs = jax.grad(lambda s: losses.softmax_loss(x, y, s))(2.0)
    fd = (np_softmax_loss(x, y, 2 + eps) - np_softmax_loss(x, y, 2 - eps)) / (2 * eps)
    np.testing.assert_allclose(gs, fd, rtol=1e-5)


def test_logit_stats():
  eye = jnp.eye(4, dtype=jnp.float32)
  st = losses.logit_stats(eye, eye, jnp.float32(10.0), jnp.float32(-10.0))
  np.testing.assert_allclose(st["pos_logit"], 0.0, atol=1e-6)
  np.testing.assert_allclose(st["neg_logit"], -10.0, atol=1e-6)


def test_standard_init_values():
  assert losses.INIT_VALUES["softmax"]["temperature_init"] == pytest.approx(math.log(1 / 0.07))
  assert losses.INIT_VALUES["sigmoid"]["temperature_init"] == pytest.approx(math.log(10))
  assert losses.INIT_VALUES["sigmoid"]["bias_init"] == -10.0


def test_unknown_loss_names_field_and_choices():
  eye = jnp.eye(2)
  with pytest.raises(ConfigError, match=r"config\.loss='hinge'.*'softmax', 'sigmoid'"):
    losses.contrastive_loss("hinge", eye, eye, 1.0, None)
