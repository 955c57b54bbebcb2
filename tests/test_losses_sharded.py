"""Sharded contrastive losses against the global-batch definitions and a NumPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_vlp import losses, losses_sharded
from big_vlp.config_errors import ConfigError
from big_vlp.sharding import make_mesh

MESHES = [(8, 1), (2, 4), (1, 1)]


def np_sigmoid_loss(x, y, s, b):
  """SigLIP: -(1/N) sum_ij log_sigmoid(z_ij (s x_i.y_j + b)), z = +1 on the diagonal."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = len(x)
  z = 2.0 * np.eye(n) - 1.0
  logits = s * x @ y.T + b
  return float(np.sum(np.logaddexp(0.0, -z * logits)) / n)


def np_softmax_loss(x, y, s):
  """CLIP: mean of the image->text and text->image cross-entropies."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  logits = s * x @ y.T
  diag = np.diag(logits)
  lse_rows = np.log(np.exp(logits).sum(axis=1))
  lse_cols = np.log(np.exp(logits).sum(axis=0))
  return float(0.5 * (np.mean(lse_rows - diag) + np.mean(lse_cols - diag)))


def _normed(rng, n, d):
  v = rng.normal(size=(n, d))
  return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _mesh(shape):
  data, fsdp = shape
  return make_mesh({"data": data, "fsdp": fsdp}, jax.devices()[:data * fsdp])


def _inputs(mesh, batch, d, seed):
  rng = np.random.default_rng(seed)
  x, y = _normed(rng, batch, d), _normed(rng, batch, d)
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  return x, y, jax.device_put(x, sh), jax.device_put(y, sh)


SCALES = [(10.0, -10.0), (3.7, 0.8), (1.3, -2.4)]


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("batch", [16, 32])
@pytest.mark.parametrize("s,b", SCALES)
def test_values_match_global_and_numpy(shape, batch, s, b):
  mesh = _mesh(shape)
  x, y, xs, ys = _inputs(mesh, batch, 8, seed=batch + shape[0])
  s, b = jnp.float32(s), jnp.float32(b)
  ring = jax.jit(lambda x, y, s, b: losses_sharded.ring_sigmoid_loss(x, y, s, b, mesh=mesh))
  gath = jax.jit(lambda x, y, s: losses_sharded.gather_softmax_loss(x, y, s, mesh=mesh))
  sig = ring(xs, ys, s, b)
  soft = gath(xs, ys, s)
  np.testing.assert_allclose(sig, losses.sigmoid_loss(x, y, s, b), rtol=1e-5)
  np.testing.assert_allclose(sig, np_sigmoid_loss(x, y, float(s), float(b)), rtol=1e-5)
  np.testing.assert_allclose(soft, losses.softmax_loss(x, y, s), rtol=1e-5)
  np.testing.assert_allclose(soft, np_softmax_loss(x, y, float(s)), rtol=1e-5)


def test_worked_value_identity_embeddings():
  mesh = _mesh((2, 4))
  eye = jnp.eye(16, dtype=jnp.float32)
  sig = losses_sharded.ring_sigmoid_loss(eye, eye, 10.0, -10.0, mesh=mesh)
  np.testing.assert_allclose(sig, math.log(2) + 15 * math.log1p(math.exp(-10)), atol=1e-6)
  soft = losses_sharded.gather_softmax_loss(eye, eye, 1.0, mesh=mesh)
  np.testing.assert_allclose(soft, math.log(math.e + 15) - 1, atol=1e-6)


def test_unsharded_inputs_and_random_scale():
  mesh = _mesh((2, 4))
  rng = np.random.default_rng(5)
  x, y = _normed(rng, 32, 8), _normed(rng, 32, 8)
  s, b = float(rng.uniform(0.5, 20.0)), float(rng.uniform(-12.0, 2.0))
  np.testing.assert_allclose(losses_sharded.ring_sigmoid_loss(x, y, s, b, mesh=mesh),
                             np_sigmoid_loss(x, y, s, b), rtol=1e-5)
  np.testing.assert_allclose(losses_sharded.gather_softmax_loss(x, y, s, mesh=mesh),
                             np_softmax_loss(x, y, s), rtol=1e-5)


@pytest.mark.parametrize("shape", MESHES)
def test_gradients_match_global(shape):
  mesh = _mesh(shape)
  x, y, xs, ys = _inputs(mesh, 16, 8, seed=11)
  s, b = jnp.float32(4.2), jnp.float32(-3.1)
  argn = (0, 1, 2, 3)

  g_ring = jax.jit(jax.grad(
      lambda x, y, s, b: losses_sharded.ring_sigmoid_loss(x, y, s, b, mesh=mesh),
      argnums=argn))(xs, ys, s, b)
  g_sig = jax.jit(jax.grad(losses.sigmoid_loss, argnums=argn))(x, y, s, b)
  for got, want in zip(g_ring, g_sig):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  g_gath = jax.jit(jax.grad(
      lambda x, y, s: losses_sharded.gather_softmax_loss(x, y, s, mesh=mesh),
      argnums=(0, 1, 2)))(xs, ys, s)
  g_soft = jax.jit(jax.grad(losses.softmax_loss, argnums=(0, 1, 2)))(x, y, s)
  for got, want in zip(g_gath, g_soft):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _sub_jaxprs(value):
  """Jaxprs held in an equation parameter (ClosedJaxpr, Jaxpr, or lists of them)."""
  if isinstance(value, (list, tuple)):
    for v in value:
      yield from _sub_jaxprs(v)
  elif hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in _sub_jaxprs(v):
        yield from _eqns(sub)


def _shard_map_bodies(fn, *args):
  closed = jax.make_jaxpr(fn)(*args)
  bodies = [sub for e in _eqns(closed.jaxpr) if e.primitive.name == "shard_map"
            for sub in _sub_jaxprs(e.params["jaxpr"])]
  assert bodies, "no shard_map in the jaxpr"
  return bodies


@pytest.mark.parametrize("shape", [(8, 1), (2, 4)])
def test_ring_blocks_are_b_by_b_and_ring_covers_all_devices(shape):
  mesh = _mesh(shape)
  batch, d, n = 32, 6, shape[0] * shape[1]
  b = batch // n
  _, _, xs, ys = _inputs(mesh, batch, d, seed=1)
  s, bias = jnp.float32(10.0), jnp.float32(-10.0)
  loss = lambda x, y, s, bb: losses_sharded.ring_sigmoid_loss(x, y, s, bb, mesh=mesh)
  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  # Forward: only b x b logits blocks. Backward: also the (b, D) cotangents of the
  # embeddings, which are b x b blocks times b x D embeddings.
  for fn, allowed in ((jax.jit(loss), {(b, b)}), (jax.jit(grad), {(b, b), (b, d)})):
    bodies = _shard_map_bodies(fn, xs, ys, s, bias)
    dots, perms, shapes = [], [], []
    for body in bodies:
      for e in _eqns(body):
        shapes += [tuple(v.aval.shape) for v in e.outvars if hasattr(v.aval, "shape")]
        if e.primitive.name == "dot_general":
          dots.append(tuple(e.outvars[0].aval.shape))
        if e.primitive.name == "ppermute":
          perms.append(e.params["perm"])
    assert (b, b) in dots and set(dots) <= allowed, dots
    # Nothing inside the shard_map body carries the global batch dimension.
    assert not [sh for sh in shapes if batch in sh], shapes
    # Every ppermute is a single n-cycle over the combined axes' linear indices.
    assert perms
    for perm in perms:
      succ = dict(perm)
      assert sorted(succ) == list(range(n)) and sorted(succ.values()) == list(range(n))
      seen, i = set(), 0
      while i not in seen:
        seen.add(i)
        i = succ[i]
      assert len(seen) == n


def test_gather_rows_are_b_by_batch():
  mesh = _mesh((2, 4))
  batch, b = 32, 4
  _, _, xs, ys = _inputs(mesh, batch, 8, seed=2)
  fn = jax.jit(lambda x, y, s: losses_sharded.gather_softmax_loss(x, y, s, mesh=mesh))
  dots = [tuple(e.outvars[0].aval.shape) for body in _shard_map_bodies(fn, xs, ys, 10.0)
          for e in _eqns(body) if e.primitive.name == "dot_general"]
  assert dots == [(b, batch), (b, batch)], dots


def test_dispatch_matches_global_dispatch():
  mesh = _mesh((2, 4))
  x, y, xs, ys = _inputs(mesh, 16, 8, seed=3)
  for name, bias in [("sigmoid", -10.0), ("sigmoid", None), ("softmax", None)]:
    got = losses_sharded.contrastive_loss_sharded(name, xs, ys, 10.0, bias, mesh)
    want = losses.contrastive_loss(name, x, y, 10.0, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ConfigError, match=r"config\.loss='hinge'"):
    losses_sharded.contrastive_loss_sharded("hinge", xs, ys, 10.0, None, mesh)


def test_batch_not_divisible_names_batch_and_devices():
  mesh = _mesh((2, 4))
  x = jnp.ones((12, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"batch size 12 .*device count 8"):
    losses_sharded.ring_sigmoid_loss(x, x, 10.0, -10.0, mesh=mesh)
  with pytest.raises(ValueError, match=r"batch size 12 .*device count 8"):
    losses_sharded.gather_softmax_loss(x, x, 10.0, mesh=mesh)
  with pytest.raises(ValueError, match="same shape"):
    losses_sharded.ring_sigmoid_loss(x, x[:8], 10.0, -10.0, mesh=mesh)
