"""The jitted train step: 1 device vs an 8-device (data x fsdp) mesh, real sharding, freezing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vlp import sharding, train_step
from big_vlp.config_errors import ConfigError
from big_vlp.model_factory import build_model
from big_vlp.optim import make_optimizer
from big_vlp.tree_paths import leaf_paths

VOCAB = 40


def tiny_config(loss="sigmoid", optimizer="adamw", freeze=(), eps=1e-8):
  return ml_collections.ConfigDict({
      "loss": loss, "total_steps": 10, "freeze": freeze,
      "model": {
          "image": {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 8,
                    "pool_type": "map"},
          "text": {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "max_len": 8,
                   "pool_type": "last"},
          "embed_dim": 16, "temperature_init": None, "bias_init": None, "max_scale": None},
      "optim": {"name": optimizer, "lr": 3e-3, "wd": 1e-2, "b1": 0.9, "b2": 0.95, "eps": eps,
                "grad_clip_norm": 1.0, "schedule": {"name": "cosine", "warmup_steps": 2}},
  })


def make_batch(seed, n=16):
  rng = np.random.default_rng(seed)
  text = rng.integers(3, VOCAB, size=(n, 8)).astype(np.int32)
  lengths = rng.integers(2, 8, size=n)
  for i, length in enumerate(lengths):
    text[i, length] = 1          # end of text
    text[i, length + 1:] = 0     # padding
  return {"image": rng.normal(size=(n, 16, 16, 3)).astype(np.float32), "text": text}


def run_steps(config, mesh, rules, steps=3, loss_impl="global"):
  model = build_model(config, VOCAB)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch(0).items()}
  tx, sched = make_optimizer(config, train_step.abstract_params(model, shapes))
  _, shardings = train_step.abstract_state(model, tx, rules, mesh, shapes)
  state = train_step.init_state(model, tx, shardings, shapes, seed=0)
  step = train_step.make_train_step(model, tx, config.loss, sched, shardings, mesh,
                                    loss_impl=loss_impl)
  losses, metrics = [], None
  for i in range(steps):
    state, metrics = step(state, train_step.global_batch(make_batch(i + 1), mesh))
    losses.append(float(metrics["loss"]))
  return state, losses, metrics


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_sharded_loss_step_equals_global_loss_step(loss):
  # Ring SigLIP / gather-with-grad CLIP inside the step on a 2 x 4 mesh: same losses and
  # params as the global-batch loss on one device.
  config = tiny_config(loss, eps=1e-3)
  rules = [(".*", "fsdp")]
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  eight = sharding.make_mesh({"data": 2, "fsdp": -1})
  s1, l1, _ = run_steps(config, one, rules)
  s8, l8, _ = run_steps(config, eight, rules, loss_impl="sharded")
  np.testing.assert_allclose(l1, l8, rtol=2e-5)
  for path, a, b in zip(leaf_paths(s1["params"]), jax.tree.leaves(s1["params"]),
                        jax.tree.leaves(s8["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                               err_msg=path)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_one_device_equals_8_device_mesh(loss):
  # Adam divides by sqrt(v) + eps, so with a tiny eps a gradient at rounding level (e.g.
  # attention key biases, whose true gradient is exactly zero) becomes a full-size update
  # whose sign depends on summation order. eps=1e-3 keeps such updates at rounding level
  # while real gradients (>1e-3) are still normalised as Adam does.
  config = tiny_config(loss, eps=1e-3)
  rules = [(".*", "fsdp")]
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  eight = sharding.make_mesh({"data": 2, "fsdp": -1})
  assert dict(eight.shape) == {"data": 2, "fsdp": 4}
  s1, l1, _ = run_steps(config, one, rules)
  s8, l8, _ = run_steps(config, eight, rules)
  np.testing.assert_allclose(l1, l8, rtol=2e-5)
  assert l1[0] != l1[-1]
  for path, a, b in zip(leaf_paths(s1["params"]), jax.tree.leaves(s1["params"]),
                        jax.tree.leaves(s8["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                               err_msg=path)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(s1["params"]), jax.tree.leaves(run_steps(config, one, rules, 0)[0]["params"])))
  assert moved > 1e-3  # The params did change, so equality above is not vacuous.

  # Params really are split as the rule says: largest divisible dim over 'fsdp'.
  kernel = s8["params"]["img"]["embedding"]["kernel"]          # (8, 8, 3, 32)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (8, 8, 3, 8)
  # Optimizer moments are sharded like their parameter, not replicated on one device.
  mu = s8["opt_state"].inner_states["train"].inner_state[1][0].mu
  mu_kernel = mu["img"]["embedding"]["kernel"]
  assert mu_kernel.sharding.spec == kernel.sharding.spec
  assert len(mu_kernel.sharding.device_set) == 8


def test_explicit_rules_and_replicate():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  params = {"a": {"kernel": jnp.zeros((6, 12))}, "b": jnp.zeros((5,))}
  specs = sharding.param_specs(params, [("a/kernel", (None, "fsdp")), (".*", "replicate")], mesh)
  assert specs["a"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp")
  assert specs["b"] == jax.sharding.PartitionSpec()
  # No dimension divisible by 4: 'fsdp' falls back to replication instead of failing.
  assert sharding.param_specs({"c": jnp.zeros((5, 3))}, [(".*", "fsdp")], mesh)["c"] == \
      jax.sharding.PartitionSpec()


def test_uncovered_param_is_an_error():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  with pytest.raises(ConfigError, match="no rule for these parameters: img/b"):
    sharding.param_specs({"img": {"a": jnp.zeros(2), "b": jnp.zeros(2)}}, [("img/a", "fsdp")],
                         mesh)
  with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
    sharding.param_specs({"a": jnp.zeros((2, 2))}, [(".*", ("model", None))], mesh)


def test_mesh_errors_name_the_field():
  with pytest.raises(ConfigError, match=r"config.mesh.*needs 6 devices but 8"):
    sharding.mesh_shape({"data": 3, "fsdp": 2}, 8)
  with pytest.raises(ConfigError, match="unknown axes \\['tensor'\\]"):
    sharding.mesh_shape({"data": -1, "tensor": 2}, 8)
  assert sharding.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2)


def test_frozen_params_unchanged_and_stateless():
  config = tiny_config(freeze=("img/.*",))
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  model = build_model(config, VOCAB)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch(0).items()}
  tx, _ = make_optimizer(config, train_step.abstract_params(model, shapes))
  _, shardings = train_step.abstract_state(model, tx, [(".*", "fsdp")], mesh, shapes)
  init = train_step.init_state(model, tx, shardings, shapes, seed=0)
  init_img = jax.device_get(init["params"]["img"])
  init_txt = jax.device_get(init["params"]["txt"])
  state, _, _ = run_steps(config, mesh, [(".*", "fsdp")], steps=2)
  jax.tree.map(np.testing.assert_array_equal, init_img, jax.device_get(state["params"]["img"]))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), init_txt,
                         jax.device_get(state["params"]["txt"]))
  assert all(jax.tree.leaves(changed))
  # Frozen params carry no optimizer moments.
  mu = state["opt_state"].inner_states["train"].inner_state[1][0].mu
  assert all(type(x).__name__ == "MaskedNode" for x in jax.tree.leaves(
      mu["img"], is_leaf=lambda x: type(x).__name__ == "MaskedNode"))


@pytest.mark.parametrize("optimizer", ["adafactor", "sgd"])
def test_other_optimizers_learn(optimizer):
  config = tiny_config(optimizer=optimizer)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
  _, losses, metrics = run_steps(config, mesh, [(".*", "fsdp")], steps=3)
  assert np.isfinite(losses).all()
  assert set(metrics) >= {"loss", "lr", "temperature", "bias", "pos_logit", "neg_logit"}


def test_progress_throughput_window():
  from big_vlp.metric_writer import Progress
  p = Progress(total_steps=10, start_step=0, global_batch=8)
  p.restart(1)
  assert "img_per_sec" not in p.measure(1)  # Nothing measured yet: no made-up rate.
  p.exclude(-0.5)  # As if 0.5 s had passed since the restart.
  m = p.measure(3)
  assert 0.2 < m["step_time_s"] < 0.5 and abs(m["img_per_sec"] - 8 / m["step_time_s"]) < 1e-6
  assert abs(m["eta_s"] - 7 * m["step_time_s"]) < 1e-6
