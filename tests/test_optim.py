"""Schedules against their formulas; weight decay reaches kernels only; config errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_vlp.config_errors import ConfigError
from big_vlp.optim import make_optimizer, make_schedule


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
