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
# The CLIP implementations: ring (flat memory, the default of contrastive_loss_sharded) and
# all-gather.
SOFTMAX = {"ring": losses_sharded.ring_softmax_loss,
           "gather": losses_sharded.gather_softmax_loss}


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("batch", [16, 32])
@pytest.mark.parametrize("s,b", SCALES)
def test_values_match_global_and_numpy(shape, batch, s, b):
  mesh = _mesh(shape)
  x, y, xs, ys = _inputs(mesh, batch, 8, seed=batch + shape[0])
  s, b = jnp.float32(s), jnp.float32(b)
  ring = jax.jit(lambda x, y, s, b: losses_sharded.ring_sigmoid_loss(x, y, s, b, mesh=mesh))
  sig = ring(xs, ys, s, b)
  np.testing.assert_allclose(sig, losses.sigmoid_loss(x, y, s, b), rtol=1e-5)
  np.testing.assert_allclose(sig, np_sigmoid_loss(x, y, float(s), float(b)), rtol=1e-5)
  for impl, loss in SOFTMAX.items():
    soft = jax.jit(lambda x, y, s, loss=loss: loss(x, y, s, mesh=mesh))(xs, ys, s)
    np.testing.assert_allclose(soft, losses.softmax_loss(x, y, s), rtol=1e-5, err_msg=impl)
    np.testing.assert_allclose(soft, np_softmax_loss(x, y, float(s)), rtol=1e-5,
                               err_msg=impl)


def test_worked_value_identity_embeddings():
  mesh = _mesh((2, 4))
  eye = jnp.eye(16, dtype=jnp.float32)
  sig = losses_sharded.ring_sigmoid_loss(eye, eye, 10.0, -10.0, mesh=mesh)
  np.testing.assert_allclose(sig, math.log(2) + 15 * math.log1p(math.exp(-10)), atol=1e-6)
  for impl, loss in SOFTMAX.items():
    np.testing.assert_allclose(loss(eye, eye, 1.0, mesh=mesh), math.log(math.e + 15) - 1,
                               atol=1e-6, err_msg=impl)


def test_ring_softmax_large_scale_is_stable():
  """Online logsumexp: no overflow where exp(logits) alone would (s = 200)."""
  mesh = _mesh((2, 4))
  x, y, xs, ys = _inputs(mesh, 32, 8, seed=9)
  got = losses_sharded.ring_softmax_loss(xs, ys, 200.0, mesh=mesh)
  assert np.isfinite(got)
  np.testing.assert_allclose(got, np_softmax_loss(x, y, 200.0), rtol=1e-5)
  grads = jax.grad(lambda x, y: losses_sharded.ring_softmax_loss(x, y, 200.0, mesh=mesh),
                   argnums=(0, 1))(xs, ys)
  want = jax.grad(lambda x, y: losses.softmax_loss(x, y, 200.0), argnums=(0, 1))(x, y)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_unsharded_inputs_and_random_scale():
  mesh = _mesh((2, 4))
  rng = np.random.default_rng(5)
  x, y = _normed(rng, 32, 8), _normed(rng, 32, 8)
  s, b = float(rng.uniform(0.5, 20.0)), float(rng.uniform(-12.0, 2.0))
  np.testing.assert_allclose(losses_sharded.ring_sigmoid_loss(x, y, s, b, mesh=mesh),
                             np_sigmoid_loss(x, y, s, b), rtol=1e-5)
  for impl, loss in SOFTMAX.items():
    np.testing.assert_allclose(loss(x, y, s, mesh=mesh), np_softmax_loss(x, y, s),
                               rtol=1e-5, err_msg=impl)


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

  g_soft = jax.jit(jax.grad(losses.softmax_loss, argnums=(0, 1, 2)))(x, y, s)
  for impl, loss in SOFTMAX.items():
    got = jax.jit(jax.grad(lambda x, y, s, loss=loss: loss(x, y, s, mesh=mesh),
                           argnums=(0, 1, 2)))(xs, ys, s)
    for g, want in zip(got, g_soft):
      np.testing.assert_allclose(g, want, atol=1e-5, rtol=1e-5, err_msg=impl)


def test_ring_gradients_keep_input_dtype():
  """bfloat16 embeddings get bfloat16 gradients (the blocks are still float32)."""
  mesh = _mesh((2, 4))
  _, _, xs, ys = _inputs(mesh, 16, 8, seed=4)
  xs, ys = xs.astype(jnp.bfloat16), ys.astype(jnp.bfloat16)
  sig = jax.grad(lambda x, y: losses_sharded.ring_sigmoid_loss(x, y, 10.0, -10.0, mesh=mesh),
                 argnums=(0, 1))(xs, ys)
  soft = jax.grad(lambda x, y: losses_sharded.ring_softmax_loss(x, y, 10.0, mesh=mesh),
                  argnums=(0, 1))(xs, ys)
  assert [g.dtype for g in sig + soft] == [jnp.bfloat16] * 4
  want = jax.grad(lambda x, y: losses.softmax_loss(x, y, 10.0), argnums=(0, 1))(
      np.asarray(xs, np.float32), np.asarray(ys, np.float32))
  for g, w in zip(soft, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=2e-2, rtol=2e-2)


def test_ring_backward_weights_each_devices_part_by_its_own_cotangent():
  """The custom_vjps are right for any per-device cotangent, not only the psum's uniform one.

  The ring softmax's column (text) terms are computed on other devices than the one whose
  output they belong to, so their cotangent must travel with the text block.
  """
  shape = (2, 4)
  mesh, n = _mesh(shape), shape[0] * shape[1]
  x, y, xs, ys = _inputs(mesh, 32, 8, seed=6)
  axes = ("data", "fsdp")
  w = jnp.arange(1.0, n + 1.0)  # a different weight on each device's part
  s, bias = jnp.float32(3.0), jnp.float32(-2.0)

  # pylint: disable=protected-access
  def sharded(local_fn, *scalars):
    def part(x, y, *sc):
      return local_fn(x, y, *losses_sharded._varying(sc, axes))[None]
    parts = jax.shard_map(part, mesh=mesh, in_specs=(P(axes), P(axes)) + (P(),) * len(scalars),
                          out_specs=P(axes))
    return lambda x, y, *sc: jnp.sum(w * parts(x, y, *sc))

  def global_parts(x, y, s, bias=None):
    rows = len(x) // n
    logits = losses.pair_logits(x, y, s)
    if bias is None:  # CLIP: each device's image rows and its text columns.
      per_row = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
      per_col = jax.nn.logsumexp(logits, axis=0) - jnp.diagonal(logits)
      return 0.5 * (per_row + per_col).reshape(n, rows).sum(axis=1)
    labels = 2.0 * jnp.eye(len(x)) - 1.0  # SigLIP: each device's image rows.
    per_row = -jnp.sum(jax.nn.log_sigmoid(labels * (logits + bias)), axis=1)
    return per_row.reshape(n, rows).sum(axis=1)

  cases = [(losses_sharded._ring_softmax_local(axes, n), (s,)),
           (losses_sharded._ring_sigmoid_local(axes, n), (s, bias))]
  for local_fn, scalars in cases:
    argn = tuple(range(2 + len(scalars)))
    weighted = lambda x, y, *sc: jnp.sum(w * global_parts(x, y, *sc))
    got, got_grads = jax.jit(jax.value_and_grad(sharded(local_fn, *scalars), argnums=argn))(
        xs, ys, *scalars)
    want, want_grads = jax.value_and_grad(weighted, argnums=argn)(x, y, *scalars)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, wt in zip(got_grads, want_grads):
      np.testing.assert_allclose(g, wt, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", [(8, 1), (2, 4)])
def test_ring_blocks_are_b_by_b_and_ring_covers_all_devices(shape, name):
  mesh = _mesh(shape)
  batch, d, n = 32, 6, shape[0] * shape[1]
  b = batch // n
  _, _, xs, ys = _inputs(mesh, batch, d, seed=1)
  if name == "sigmoid":
    args = (xs, ys, jnp.float32(10.0), jnp.float32(-10.0))
    loss = lambda x, y, s, bb: losses_sharded.ring_sigmoid_loss(x, y, s, bb, mesh=mesh)
  else:
    args = (xs, ys, jnp.float32(10.0))
    loss = lambda x, y, s: losses_sharded.ring_softmax_loss(x, y, s, mesh=mesh)
  grad = jax.grad(loss, argnums=tuple(range(len(args))))
  # Forward: only b x b logits blocks. Backward: also the (b, D) cotangents of the
  # embeddings, which are b x b blocks times b x D embeddings.
  for fn, allowed in ((jax.jit(loss), {(b, b)}), (jax.jit(grad), {(b, b), (b, d)})):
    bodies = _shard_map_bodies(fn, *args)
    dots, perms, shapes = [], [], []
    for body in bodies:
      for e in _eqns(body):
        shapes += [tuple(v.aval.shape) for v in e.outvars if hasattr(v.aval, "shape")]
        if e.primitive.name == "dot_general":
          dots.append(tuple(e.outvars[0].aval.shape))
        if e.primitive.name == "ppermute":
          perms.append(e.params["perm"])
    assert (b, b) in dots and set(dots) <= allowed, dots
    # Nothing inside the shard_map body carries the global batch dimension, and nothing is
    # stacked per hop (reverse mode through the ring would save [hops, b, b] residuals).
    assert not [sh for sh in shapes if batch in sh], shapes
    assert max(len(sh) for sh in shapes) <= 2, shapes
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
  # 'softmax' is the ring (flat memory), not the all-gather.
  fn = jax.jit(lambda x, y: losses_sharded.contrastive_loss_sharded(
      "softmax", x, y, 10.0, None, mesh))
  bodies = _shard_map_bodies(fn, xs, ys)
  names = {e.primitive.name for body in bodies for e in _eqns(body)}
  assert "ppermute" in names and "all_gather" not in names, names
  with pytest.raises(ConfigError, match=r"config\.loss='hinge'"):
    losses_sharded.contrastive_loss_sharded("hinge", xs, ys, 10.0, None, mesh)


def test_batch_not_divisible_names_batch_and_devices():
  mesh = _mesh((2, 4))
  x = jnp.ones((12, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"batch size 12 .*device count 8"):
    losses_sharded.ring_sigmoid_loss(x, x, 10.0, -10.0, mesh=mesh)
  for loss in SOFTMAX.values():
    with pytest.raises(ValueError, match=r"batch size 12 .*device count 8"):
      loss(x, x, 10.0, mesh=mesh)
  with pytest.raises(ValueError, match="same shape"):
    losses_sharded.ring_sigmoid_loss(x, x[:8], 10.0, -10.0, mesh=mesh)
