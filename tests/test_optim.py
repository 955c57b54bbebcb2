"""Schedules against their formulas; weight decay reaches kernels only; config errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_vlp.config_errors import ConfigError
from big_vlp.optim import clip_by_global_norm, make_optimizer, make_schedule


def optim_cfg(name="cosine", **sched):
  return ml_collections.ConfigDict({
      "name": "adamw", "lr": 0.1, "wd": 0.5, "b1": 0.9, "b2": 0.999, "grad_clip_norm": None,
      "schedule": {"name": name, "warmup_steps": 10, **sched}})


def test_cosine_schedule_values():
  f = make_schedule(optim_cfg("cosine", end_factor=0.1), total_steps=110)
  np.testing.assert_allclose(f(0), 0.1 * 1 / 10, rtol=1e-6)       # Linear warmup.
  np.testing.assert_allclose(f(4), 0.1 * 5 / 10, rtol=1e-6)
  np.testing.assert_allclose(f(10), 0.1, rtol=1e-6)               # Peak after warmup.
  mid = 0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  np.testing.assert_allclose(f(60), mid, rtol=1e-6)
  np.testing.assert_allclose(f(110), 0.1 * 0.1, rtol=1e-6)        # Ends at end_factor.


def test_rsqrt_and_linear_schedules():
  f = make_schedule(optim_cfg("rsqrt", timescale=100, cooldown_steps=20), total_steps=200)
  for s in (10, 50, 150):
    np.testing.assert_allclose(f(s), 0.1 / math.sqrt(1 + (s - 10) / 100), rtol=1e-6)
  np.testing.assert_allclose(f(190), 0.1 / math.sqrt(1 + 180 / 100) * 0.5, rtol=1e-6)
  np.testing.assert_allclose(f(200), 0.0, atol=1e-9)
  g = make_schedule(optim_cfg("linear"), total_steps=110)
  np.testing.assert_allclose(g(60), 0.05, rtol=1e-6)


def test_weight_decay_on_kernels_only():
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
            "ln": {"scale": jnp.ones(2)}, "t": jnp.ones(())}
  config = ml_collections.ConfigDict({"total_steps": 100, "freeze": (),
                                      "optim": optim_cfg("constant")})
  tx, _ = make_optimizer(config, params)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  # Decoupled decay: kernel -= lr * wd * kernel; everything else untouched.
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * 0.1, rtol=1e-6)
  for leaf in (updates["dense"]["bias"], updates["ln"]["scale"], updates["t"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_gradient_clipping():
  params = {"w": jnp.zeros(4)}
  cfg = optim_cfg("constant")
  cfg.name, cfg.grad_clip_norm, cfg.wd = "sgd", 1.0, 0.0
  cfg.schedule.warmup_steps = 0
  config = ml_collections.ConfigDict({"total_steps": 10, "freeze": (), "optim": cfg})
  tx, _ = make_optimizer(config, params)
  updates, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 0.1 * 1.0, rtol=1e-5)


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_clip_by_global_norm_against_numpy_and_optax(max_norm):
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(5, 7)).astype(np.float32),
          "b": {"c": rng.normal(size=(11,)).astype(np.float32)}}
  norm = np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in jax.tree.leaves(tree)))
  tx = clip_by_global_norm(max_norm)
  state = tx.init(tree)
  assert state == optax.clip_by_global_norm(max_norm).init(tree)  # Checkpoints unchanged.
  got, _ = jax.jit(tx.update)(tree, state)
  ref, _ = optax.clip_by_global_norm(max_norm).update(tree, state)
  for g, x, r in zip(jax.tree.leaves(got), jax.tree.leaves(tree), jax.tree.leaves(ref)):
    if norm < max_norm:  # Untouched, bit for bit.
      np.testing.assert_array_equal(g, x)
    else:
      np.testing.assert_allclose(g, x * (max_norm / norm), rtol=2e-6)
    np.testing.assert_allclose(g, r, rtol=2e-6)
  assert np.isclose(optax.tree.norm(got), min(norm, max_norm), rtol=1e-5)


def test_bad_optimizer_fields():
  params = {"w": jnp.zeros(2)}
  config = ml_collections.ConfigDict({"total_steps": 10, "freeze": (),
                                      "optim": optim_cfg("exponential")})
  with pytest.raises(ConfigError, match=r"optim\.schedule\.name='exponential'.*'cosine'"):
    make_optimizer(config, params)
  config.optim.schedule.name = "cosine"
  config.freeze = (".*",)
  with pytest.raises(ConfigError, match=r"config\.freeze.*freezes every parameter"):
    make_optimizer(config, params)


def _states(state, cls):
  """Every `cls` node (e.g. optax.ScaleByAdamState) inside an optimizer state."""
  return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
          if isinstance(s, cls)]


def _moment_config(name: str, mu_dtype: str, b1: float = 0.9) -> ml_collections.ConfigDict:
  """A 10-step constant-lr config that freezes the `frozen` param."""
  cfg = optim_cfg("constant")
  cfg.name, cfg.b1, cfg.mu_dtype = name, b1, mu_dtype
  cfg.schedule.warmup_steps = 0
  return ml_collections.ConfigDict({"total_steps": 10, "freeze": ("frozen",), "optim": cfg})


PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, "frozen": jnp.ones(2)}
GRADS = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)


@pytest.mark.parametrize("mu_dtype, want", [("float32", jnp.float32),
                                            ("bfloat16", jnp.bfloat16)])
def test_adamw_mu_dtype(mu_dtype, want):
  tx, _ = make_optimizer(_moment_config("adamw", mu_dtype), PARAMS)
  state = tx.init(PARAMS)
  (adam,) = _states(state, optax.ScaleByAdamState)
  mus, nus = jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)
  assert len(mus) == 2 and all(m.dtype == want for m in mus)    # Trained params only.
  assert len(nus) == 2 and all(n.dtype == jnp.float32 for n in nus)
  updates, state = jax.jit(tx.update)(GRADS, state, PARAMS)
  (adam,) = _states(state, optax.ScaleByAdamState)
  assert all(m.dtype == want for m in jax.tree.leaves(adam.mu))  # Kept after a step.
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
  # First step of Adam is -lr * sign(g) (plus decay on the kernel), bfloat16 mu or not.
  np.testing.assert_allclose(updates["dense"]["bias"], -0.1, rtol=1e-2)
  np.testing.assert_array_equal(updates["frozen"], 0.0)


@pytest.mark.parametrize("name, cls, field", [("adafactor", optax.EmaState, "ema"),
                                              ("sgd", optax.TraceState, "trace")])
def test_momentum_dtype_other_optimizers(name, cls, field):
  tx, _ = make_optimizer(_moment_config(name, "bfloat16"), PARAMS)
  state = tx.init(PARAMS)
  (momentum,) = _states(state, cls)
  leaves = jax.tree.leaves(getattr(momentum, field))
  assert len(leaves) == 2 and all(m.dtype == jnp.bfloat16 for m in leaves)
  updates, _ = tx.update(GRADS, state, PARAMS)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_bad_mu_dtype():
  with pytest.raises(ConfigError, match=r"optim\.mu_dtype='float16'.*'float32', 'bfloat16'"):
    make_optimizer(_moment_config("adamw", "float16"), PARAMS)
