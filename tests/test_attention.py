"""The attention core of models/attention.py: value and hand-written gradients against a
float64 NumPy implementation of softmax attention (forward and backward worked out
independently), with and without masks, padded or not, float32 and bfloat16 operands, and
the flax modules that use it."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vlp.models import common
from big_vlp.models.attention import make_attention_fn

RNG = np.random.default_rng(0)
B, LQ, LK, H, D = 3, 7, 9, 2, 8


def numpy_attention(q, k, v, mask, g):
  """Output and (dq, dk, dv) of sum(attention(q, k, v) * g), in float64.

  q [b, lq, h, d], k / v [b, lk, h, d], mask broadcastable to [b, h, lq, lk] or None.
  """
  q, k, v, g = (np.asarray(t, np.float64) for t in (q, k, v, g))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  m = np.ones(s.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), s.shape)
  s = np.where(m, s, np.finfo(np.float32).min)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  dp = np.einsum("bqhd,bkhd->bhqk", g, v)
  dv = np.einsum("bhqk,bqhd->bkhd", p, g)
  ds = np.where(m, p * (dp - (dp * p).sum(-1, keepdims=True)), 0.0) / np.sqrt(q.shape[-1])
  dq = np.einsum("bhqk,bkhd->bqhd", ds, k)
  dk = np.einsum("bhqk,bqhd->bkhd", ds, q)
  return out, (dq, dk, dv)


def _inputs():
  q = RNG.standard_normal((B, LQ, H, D)).astype(np.float32)
  k = RNG.standard_normal((B, LK, H, D)).astype(np.float32)
  v = RNG.standard_normal((B, LK, H, D)).astype(np.float32)
  g = RNG.standard_normal((B, LQ, H, D)).astype(np.float32)
  return q, k, v, g


def _masks():
  random = RNG.random((B, 1, LQ, LK)) > 0.3
  random[0, 0, 2] = False  # A fully masked row attends uniformly and passes no gradient.
  causal = np.broadcast_to(np.tril(np.ones((LQ, LK), bool)), (B, H, LQ, LK))
  keys = RNG.random((B, 1, 1, LK)) > 0.2  # MAP-head / padding style.
  return {"none": None, "random": random, "causal": causal, "keys": keys}


def _run(fn, q, k, v, g, mask):
  m = None if mask is None else jnp.asarray(mask)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask=m).astype(jnp.float32) * g)
  out = jax.jit(lambda q, k, v: fn(q, k, v, mask=m))(q, k, v)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  return out, grads


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("mask_name", ["none", "random", "causal", "keys"])
def test_float32_core_matches_numpy_value_and_gradients(pad, mask_name):
  q, k, v, g = _inputs()
  mask = _masks()[mask_name]
  out, grads = _run(make_attention_fn(None, pad), q, k, v, g, mask)
  ref_out, ref_grads = numpy_attention(q, k, v, mask, g)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  if mask_name == "random":  # The fully masked row: uniform weights, no q gradient.
    np.testing.assert_allclose(out[0, 2], v[0].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(grads[0][0, 2], 0.0)


def test_matches_flax_einsum_core_bitwise_close():
  q, k, v, g = _inputs()
  mask = jnp.asarray(_masks()["causal"])
  ref = lambda q, k, v, mask: nn.dot_product_attention(q, k, v, mask=mask,
                                                      force_fp32_for_softmax=True)
  for fn in (make_attention_fn(None, True), make_attention_fn(None, False)):
    a, ga = _run(fn, q, k, v, g, mask)
    b, gb = _run(ref, q, k, v, g, mask)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_bfloat16_operands_stay_close_but_are_not_float32():
  q, k, v, g = _inputs()
  mask = _masks()["random"]
  out, grads = _run(make_attention_fn(jnp.bfloat16, True), q, k, v, g, mask)
  ref_out, ref_grads = numpy_attention(q, k, v, mask, g)
  assert out.dtype == jnp.float32 and all(t.dtype == jnp.float32 for t in grads)
  scale = lambda t: np.abs(t).max()
  assert np.abs(out - ref_out).max() < 2e-2 * scale(ref_out)
  for got, want in zip(grads, ref_grads):
    assert np.abs(got - want).max() < 4e-2 * scale(want)
  # Operands really are rounded: the result differs from the float32 core.
  out32, _ = _run(make_attention_fn(None, True), q, k, v, g, mask)
  assert np.abs(out - out32).max() > 1e-4


def test_bfloat16_activations_give_bfloat16_outputs():
  q, k, v, g = (jnp.asarray(t, jnp.bfloat16) for t in _inputs())
  fn = make_attention_fn(None, True)
  out, grads = _run(fn, q, k, v, g, None)
  assert out.dtype == jnp.bfloat16 and all(t.dtype == jnp.bfloat16 for t in grads)
  ref_out, _ = numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                               v.astype(jnp.float32), None, g.astype(jnp.float32))
  assert np.abs(np.asarray(out, np.float32) - ref_out).max() < 3e-2 * np.abs(ref_out).max()


@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_encoder_block_uses_the_core_on_cpu_and_matches_flax(matmul_dtype):
  """A block built by common._attention runs this core here (a CPU) and gives flax's
  attention (with the same params) to float32 rounding, or to bf16 tolerance."""
  x = jnp.asarray(RNG.standard_normal((2, 11, 32)), jnp.float32)
  mask = jnp.asarray(np.tril(np.ones((11, 11), bool)))[None, None]
  ours = common._attention(4, jnp.float32, matmul_dtype)
  assert ours.attention_fn is not nn.dot_product_attention
  theirs = nn.MultiHeadDotProductAttention(num_heads=4, dtype=jnp.float32,
                                           force_fp32_for_softmax=True)
  params = ours.init(jax.random.PRNGKey(0), x, x, mask=mask)
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x, x, mask=mask)))
  la, ga = jax.value_and_grad(loss(ours))(params)
  lb, gb = jax.value_and_grad(loss(theirs))(params)
  tol = 1e-5 if matmul_dtype == "float32" else 3e-2
  np.testing.assert_allclose(la, lb, rtol=tol)
  # Against the largest gradient: the key bias's is zero up to rounding (softmax ignores
  # a shift shared by all keys).
  scale = max(np.abs(b).max() for b in jax.tree.leaves(gb))
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    assert np.abs(a - b).max() <= tol * scale


def _batched_dot_operand_types(fn, *args) -> list[tuple[str, str]]:
  """Element types of the two operands of every batched dot in the optimised HLO."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", text))
  types.update(re.findall(r"([\w.\-]+): (\w+)\[", text))
  out = []
  for line in text.splitlines():
    if " dot(" in line and "lhs_batch_dims" in line:
      lhs, rhs = re.search(r"dot\(%([\w.\-]+), %([\w.\-]+)\)", line).groups()
      out.append((types[lhs], types[rhs]))
  return out


def test_bfloat16_dots_stay_bfloat16_in_xla_cpu():
  """With bf16 operands the six batched dots of forward + backward run as bf16 x bf16 ->
  f32 dots, not as float32 dots XLA:CPU upcast them to (2-3x slower): the q / k / v / dO
  that reach the core as transposes are re-laid out first (attention._operand)."""
  shape = (2, 64, 2, 32)  # [b, l, h, d]: large enough for XLA:CPU's library dots.
  q, k, v, g = (jnp.asarray(RNG.standard_normal(shape), jnp.float32) for _ in range(4))
  fn = make_attention_fn(jnp.bfloat16, True)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * g)
  types = _batched_dot_operand_types(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v)
  assert len(types) == 6, types
  assert all(t == ("bf16", "bf16") for t in types), types
  # The float32 core keeps float32 dots.
  loss32 = lambda q, k, v: jnp.sum(make_attention_fn(None, True)(q, k, v) * g)
  types32 = _batched_dot_operand_types(jax.value_and_grad(loss32, argnums=(0, 1, 2)), q, k, v)
  assert len(types32) == 6 and all(t == ("f32", "f32") for t in types32), types32


@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_fused_self_attention_is_flax_attention_with_the_same_params(matmul_dtype):
  """common.SelfAttention (q/k/v as one matmul) creates exactly the params flax's
  MultiHeadDotProductAttention creates (names, shapes, initial values, so checkpoints and
  pretrained weights carry over) and computes the same function and gradients."""
  x = jnp.asarray(RNG.standard_normal((2, 11, 32)), jnp.float32)
  mask = jnp.asarray(np.tril(np.ones((11, 11), bool)))[None, None]
  fused = common.SelfAttention(4, jnp.float32, matmul_dtype)
  flax_mha = common._attention(4, jnp.float32, matmul_dtype)
  ours = fused.init(jax.random.PRNGKey(3), x, mask)
  theirs = flax_mha.init(jax.random.PRNGKey(3), x, x, mask=mask)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.shape == b.shape and np.array_equal(a, b)
  # Same params, applied by both: same outputs (float32 summation order aside) and grads.
  params = jax.tree.map(lambda t: t + 0.01 * RNG.standard_normal(t.shape), theirs)
  loss_a = lambda p: jnp.sum(jnp.sin(fused.apply(p, x, mask)))
  loss_b = lambda p: jnp.sum(jnp.sin(flax_mha.apply(p, x, x, mask=mask)))
  la, ga = jax.value_and_grad(loss_a)(params)
  lb, gb = jax.value_and_grad(loss_b)(params)
  tol = 1e-5 if matmul_dtype == "float32" else 1e-2
  np.testing.assert_allclose(la, lb, rtol=tol)
  scale = max(np.abs(b).max() for b in jax.tree.leaves(gb))
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    assert np.abs(a - b).max() <= tol * scale
