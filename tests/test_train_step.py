"""The jitted train step: 1 device vs 8-device data / fsdp / tensor meshes, exact gradient
accumulation, sharding rules, freezing."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_vlp import losses, sharding, train_step
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


def run_steps(config, mesh, rules, steps=3, loss_impl="global", same_batch=False):
  """`steps` train steps on batches 1..steps (or batch 1 every time): (state, losses,
  last metrics)."""
  model = build_model(config, VOCAB)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch(0).items()}
  tx, sched = make_optimizer(config, train_step.abstract_params(model, shapes))
  _, shardings = train_step.abstract_state(model, tx, rules, mesh, shapes)
  state = train_step.init_state(model, tx, shardings, shapes, seed=0)
  step = train_step.make_train_step(model, tx, config.loss, sched, shardings, mesh,
                                    loss_impl=loss_impl)
  losses, metrics = [], None
  for i in range(steps):
    batch = make_batch(1 if same_batch else i + 1)
    state, metrics = step(state, train_step.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return state, losses, metrics


@functools.lru_cache(maxsize=None)
def one_device_run(loss):
  """Reference: 2 steps on one device (cached: several mesh tests compare against it)."""
  one = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  s1, l1, _ = run_steps(tiny_config(loss, eps=1e-3), one, sharding.TRANSFORMER_RULES, steps=2)
  return jax.device_get(s1["params"]), l1


# (mesh, mesh_dcn): data / FSDP / tensor parallel alone and mixed, and across 2 "slices".
MESHES = {
    "data8": ({"data": -1}, None),
    "fsdp8": ({"data": 1, "fsdp": -1}, None),
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, None),
    "fsdp4_tensor2": ({"data": 1, "fsdp": 4, "tensor": 2}, None),
    "dcn_data2_x_fsdp2_tensor2": ({"data": 1, "fsdp": 2, "tensor": 2}, {"data": 2}),
}


@pytest.mark.parametrize("loss,mesh_name,impl", [
    ("sigmoid", "data8", "global"), ("sigmoid", "fsdp8", "global"),
    ("sigmoid", "data2_fsdp2_tensor2", "sharded"), ("sigmoid", "fsdp4_tensor2", "global"),
    ("sigmoid", "dcn_data2_x_fsdp2_tensor2", "sharded"),
    ("softmax", "data2_fsdp2_tensor2", "sharded")])
def test_one_device_equals_8_device_mesh(loss, mesh_name, impl):
  # Adam divides by sqrt(v) + eps, so with a tiny eps a gradient at rounding level (e.g.
  # attention key biases, whose true gradient is exactly zero) becomes a full-size update
  # whose sign depends on summation order. eps=1e-3 keeps such updates at rounding level
  # while real gradients (>1e-3) are still normalised as Adam does.
  config = tiny_config(loss, eps=1e-3)
  mesh_cfg, dcn = MESHES[mesh_name]
  eight = sharding.make_mesh(mesh_cfg, dcn_cfg=dcn)
  assert eight.devices.size == 8
  p1, l1 = one_device_run(loss)
  # The global loss on one device vs the global or the ring (shard_map) loss on the mesh.
  s8, l8, _ = run_steps(config, eight, sharding.TRANSFORMER_RULES, steps=2, loss_impl=impl)
  np.testing.assert_allclose(l1, l8, rtol=2e-5)
  assert l1[0] != l1[-1]
  for path, a, b in zip(leaf_paths(p1), jax.tree.leaves(p1), jax.tree.leaves(s8["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                               err_msg=path)

  # Params really are split as the logical rules say: width over 'fsdp', MLP hidden units
  # and heads over 'tensor'; Adam's moments follow their parameter.
  fsdp, tensor = eight.shape["fsdp"], eight.shape["tensor"]
  blk = s8["params"]["img"]["Transformer"]["encoderblock_0"]
  mlp_in = blk["MlpBlock_0"]["Dense_0"]["kernel"]                      # (32, 64)
  assert mlp_in.addressable_shards[0].data.shape == (32 // fsdp, 64 // tensor)
  query = blk["MultiHeadDotProductAttention_0"]["query"]["kernel"]     # (32, 2 heads, 16)
  assert query.addressable_shards[0].data.shape == (32 // fsdp, 2 // tensor, 16)
  mu = s8["opt_state"].inner_states["train"].inner_state[1][0].mu
  mu_mlp = mu["img"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert mu_mlp.sharding.spec == mlp_in.sharding.spec
  assert len(mu_mlp.sharding.device_set) == 8


@pytest.mark.parametrize("loss,impl", [("sigmoid", "sharded"), ("softmax", "global")])
def test_accumulated_gradient_equals_full_batch_gradient(loss, impl):
  # 4 micro-batches on a data x fsdp x tensor mesh: the same loss and gradient (all params,
  # including temperature and bias) as the whole batch at once.
  config = tiny_config(loss)
  model = build_model(config, VOCAB)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  batch = train_step.global_batch(make_batch(5, n=32), mesh)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  params = jax.jit(lambda r: train_step._init_params(model, r, shapes))(jax.random.PRNGKey(0))
  if "b" in params:  # Away from the init's b = -10, where negatives hardly matter.
    params["b"] = jnp.zeros_like(params["b"])
  full = jax.jit(train_step.make_grad_fn(model, loss, mesh, impl, 1))
  accum = jax.jit(train_step.make_grad_fn(model, loss, mesh, impl, 4))
  (l_full, g_full, aux_full), (l_acc, g_acc, aux_acc) = [
      jax.device_get(f(params, batch, jax.random.PRNGKey(1))) for f in (full, accum)]
  np.testing.assert_allclose(l_acc, l_full, rtol=1e-5)
  for path, a, b in zip(leaf_paths(g_full), jax.tree.leaves(g_full), jax.tree.leaves(g_acc)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5, err_msg=path)
  assert abs(float(g_full["t"])) > 1e-4  # The temperature's gradient is counted once.
  np.testing.assert_allclose(aux_acc[0], aux_full[0], rtol=1e-5, atol=1e-6)
  # Not the average of per-micro-batch gradients, which a naive accumulation would give.
  naive = jax.jit(lambda p, b: jax.grad(lambda q: sum(
      losses.contrastive_loss(loss, *_embed_scale(model, q, b, j)) for j in range(4)) / 4)(p))
  g_naive = jax.device_get(naive(params, batch))
  diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(
      jax.tree.leaves(g_naive), jax.tree.leaves(g_full))))
  assert diff > 0.05 * float(optax.tree.norm(g_full))


def _embed_scale(model, params, batch, j):
  micro = {k: v[j::4] for k, v in batch.items()}
  zimg, ztxt, out = model.apply({"params": params}, micro["image"], micro["text"])
  return zimg, ztxt, out["scale"], out["bias"]


def test_explicit_rules_and_replicate():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  params = {"a": {"kernel": jnp.zeros((6, 12))}, "b": jnp.zeros((5,))}
  specs = sharding.param_specs(params, [("a/kernel", (None, "fsdp")), (".*", "replicate")], mesh)
  assert specs["a"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp")
  assert specs["b"] == jax.sharding.PartitionSpec()
  # No dimension divisible by 4: 'fsdp' falls back to replication instead of failing.
  assert sharding.param_specs({"c": jnp.zeros((5, 3))}, [(".*", "fsdp")], mesh)["c"] == \
      jax.sharding.PartitionSpec()


def test_logical_axis_rules():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  params = {"mlp": jnp.zeros((8, 6)), "scanned": jnp.zeros((3, 8, 6)),
            "odd": jnp.zeros((5, 6)), "twice": jnp.zeros((8, 8))}
  rules = [("mlp|scanned|odd", ("embed", "mlp")), ("twice", ("fsdp", "fsdp"))]
  specs = sharding.param_specs(params, rules, mesh)
  P = jax.sharding.PartitionSpec
  assert specs["mlp"] == P("fsdp", "tensor")
  assert specs["scanned"] == P(None, "fsdp", "tensor")  # A leading layer axis stays whole.
  assert specs["odd"] == P(None, "tensor")              # 5 rows don't split over fsdp=2.
  assert specs["twice"] == P("fsdp")                    # A mesh axis is used once per param.
  # Remapping a logical axis moves the split without touching the rules.
  remapped = sharding.param_specs(params, rules, mesh, {"embed": ("data", "fsdp"),
                                                        "mlp": None})
  assert remapped["mlp"] == P(("data", "fsdp"))
  with pytest.raises(ConfigError, match=r"logical_axes\['mlp'\]='model'.*not a mesh axis"):
    sharding.param_specs(params, rules, mesh, {"embed": "fsdp", "mlp": "model"})
  table = sharding.sharding_table(params, sharding.param_shardings(params, rules, mesh))
  assert "P('fsdp', 'tensor')" in table and "(4, 3)" in table


def test_uncovered_param_is_an_error():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  with pytest.raises(ConfigError, match="no rule for these parameters: img/b"):
    sharding.param_specs({"img": {"a": jnp.zeros(2), "b": jnp.zeros(2)}}, [("img/a", "fsdp")],
                         mesh)
  with pytest.raises(ConfigError, match="unknown axis 'model'.*mesh axes data, fsdp, tensor"):
    sharding.param_specs({"a": jnp.zeros((2, 2))}, [(".*", ("model", None))], mesh)


def test_mesh_errors_name_the_field():
  with pytest.raises(ConfigError, match=r"config.mesh.*needs 6 devices but 8"):
    sharding.mesh_shape({"data": 3, "fsdp": 2}, 8)
  with pytest.raises(ConfigError, match="unknown axes \\['model'\\]"):
    sharding.mesh_shape({"data": -1, "model": 2}, 8)
  assert sharding.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2, 1)
  # Within-slice degrees times across-slice (DCN) degrees; -1 is the rest at each level.
  assert sharding.mesh_shape({"data": -1, "tensor": 2}, 8, {"data": 2}) == (4, 1, 2)
  assert sharding.level_shapes({"fsdp": -1}, 8, {"data": -1}, slices=4) == ((1, 2, 1),
                                                                            (4, 1, 1))
  with pytest.raises(ConfigError, match=r"config.mesh_dcn.*3 slices.*8 devices"):
    sharding.mesh_shape({"data": -1}, 8, {"data": 3})


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
  """Trained on one batch again and again, each optimizer lowers its loss at every step."""
  config = tiny_config(optimizer=optimizer)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
  _, losses, metrics = run_steps(config, mesh, [(".*", "fsdp")], steps=4, same_batch=True)
  assert np.isfinite(losses).all()
  assert losses[0] > losses[1] > losses[2] > losses[3], losses
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


def test_nonfinite_step_is_skipped_exactly_on_a_sharded_mesh():
  """A NaN in the batch: the update (run under lax.cond) is skipped, so params and every
  optimizer moment stay bitwise what they were, the counters record the step, and the next
  finite step updates again."""
  config = tiny_config()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = build_model(config, VOCAB)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch(0).items()}
  tx, sched = make_optimizer(config, train_step.abstract_params(model, shapes))
  _, shardings = train_step.abstract_state(model, tx, sharding.TRANSFORMER_RULES, mesh, shapes)
  state = train_step.init_state(model, tx, shardings, shapes, seed=0)
  step = train_step.make_train_step(model, tx, config.loss, sched, shardings, mesh)
  state, _ = step(state, train_step.global_batch(make_batch(1), mesh))
  before = jax.device_get({k: state[k] for k in ("params", "opt_state")})
  bad = make_batch(2)
  bad["image"][3, 0, 0, 0] = np.nan
  state, metrics = step(state, train_step.global_batch(bad, mesh))
  assert not np.isfinite(float(metrics["loss"]))
  after = jax.device_get({k: state[k] for k in ("params", "opt_state")})
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert int(state["nonfinite"]["count"]) == 1 and int(state["nonfinite"]["last_step"]) == 2
  assert int(state["step"]) == 2
  state, metrics = step(state, train_step.global_batch(make_batch(3), mesh))
  assert np.isfinite(float(metrics["loss"])) and int(state["nonfinite"]["count"]) == 1
  moved = jax.device_get(state["params"])
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(before["params"]),
                                            jax.tree.leaves(moved)))
