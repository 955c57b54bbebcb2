"""Recipe switches through the one trainer: LiT locking (and staged unlocking), FLIP token
masking, distillation (teacher in the step, or stored embeddings), and a smoke run of every
recipe config through `python -m big_vlp.train` on the embedded dataset."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_vlp import losses, recipes, sharding, train_step
from big_vlp.config_errors import ConfigError
from big_vlp.config_validation import validate_config
from big_vlp.model_factory import build_model
from big_vlp.run_setup import PhasedSteps, make_run_spec
from big_vlp.tree_paths import leaf_paths
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 40


def tiny_config(**recipe):
  c = ml_collections.ConfigDict({
      "loss": "sigmoid", "total_steps": 6, "freeze": (), "batch_size": 16, "seed": 0,
      "model": {
          "image": {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "patch_size": 4,
                    "pool_type": "map"},
          "text": {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "max_len": 8,
                   "pool_type": "last"},
          "embed_dim": 16, "temperature_init": None, "bias_init": None, "max_scale": None},
      "optim": {"name": "adamw", "lr": 1e-2, "wd": 1e-2, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
                "grad_clip_norm": 1.0, "schedule": {"name": "constant", "warmup_steps": 0}},
      "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
      "sharding_rules": list(sharding.TRANSFORMER_RULES)})
  recipes.recipe_fields(c)
  for group, values in recipe.items():
    c[group].update(values) if isinstance(values, dict) else setattr(c, group, values)
  return c


def make_batch(seed, n=16):
  rng = np.random.default_rng(seed)
  text = rng.integers(3, VOCAB, size=(n, 8)).astype(np.int32)
  for i, length in enumerate(rng.integers(2, 7, size=n)):
    text[i, length] = 1
    text[i, length + 1:] = 0
  return {"image": rng.normal(size=(n, 16, 16, 3)).astype(np.float32), "text": text}


def setup(config, batch=None):
  mesh = sharding.mesh_from_config(config)
  batch = batch or make_batch(0)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  spec = make_run_spec(config, mesh, VOCAB, shapes)
  state = train_step.init_state(spec.model, spec.tx, spec.shardings, shapes, seed=0)
  return mesh, spec, state, tuple(shapes)


def run(config, steps, batches=None):
  """Params after each of `steps` steps (host copies) and the last metrics."""
  mesh, spec, state, keys = setup(config, batches[0] if batches else None)
  phased = PhasedSteps(config, spec, mesh, keys)
  history = [jax.device_get(state["params"])]
  metrics = None
  for s in range(1, steps + 1):
    batch = batches[s - 1] if batches else make_batch(s)
    state, metrics = phased.for_step(s)(state, train_step.global_batch(batch, mesh))
    history.append(jax.device_get(state["params"]))
  return history, state, metrics


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- LiT ----------------------------------------------------------------------------------

def test_locked_tower_is_bitwise_unchanged_and_has_no_optimizer_state():
  config = tiny_config(locking={"towers": ("img",)})
  history, state, metrics = run(config, 3)
  assert _same(history[0]["img"], history[-1]["img"])  # Bitwise, after 3 updates.
  assert not _same(history[0]["txt"], history[-1]["txt"])
  assert np.isfinite(metrics["loss"])
  # Optimizer state: moments for the text tower and the scalars only.
  trainable = sum(x.size for p, x in zip(leaf_paths(history[0]), jax.tree.leaves(history[0]))
                  if not p.startswith("img/"))
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0 or x.dtype != jnp.int32]
  assert sum(x.size for x in moments) == 2 * trainable  # Adam's mu and nu, nothing for img.


def test_locked_tower_runs_in_inference_mode_without_gradient():
  config = tiny_config(locking={"towers": ("txt",)})
  config.model.text.dropout = 0.5  # Would change the text embedding if it ran in training.
  mesh, spec, state, _ = setup(config)
  batch = train_step.global_batch(make_batch(1), mesh)
  grad_fn = train_step.make_grad_fn(
      spec.model, "sigmoid", mesh, options=train_step.StepOptions(
          phase=recipes.phase_at(config, 1),
          trainable=recipes.trainable(recipes.param_labels(config, state["params"]),
                                      recipes.phase_at(config, 1))))
  _, grads, (_, ztxt, _, _) = jax.jit(grad_fn)(state["params"], batch, jax.random.PRNGKey(3))
  eval_txt = spec.model.apply({"params": state["params"]}, batch["text"], method="encode_text")
  np.testing.assert_allclose(ztxt, eval_txt, rtol=1e-6, atol=1e-6)
  assert all(not np.any(g) for g in jax.tree.leaves(grads["txt"]))
  assert any(np.any(g) for g in jax.tree.leaves(grads["img"]))


def test_staged_unlock_trains_the_tower_after_the_unlock_step():
  config = tiny_config(locking={"towers": ("img",), "unlock_at_step": 2})
  history, _, _ = run(config, 4)
  assert _same(history[0]["img"], history[2]["img"])  # Steps 1-2: locked.
  assert not _same(history[2]["img"], history[3]["img"])  # Step 3: unlocked.
  assert not _same(history[0]["txt"], history[1]["txt"])


@pytest.mark.parametrize("group,values,pattern", [
    ("locking", {"towers": ("img", "txt")}, r"locking\.towers.*leave one unlocked"),
    ("locking", {"towers": ("vision",)}, r"locking\.towers='vision'.*'img', 'txt'"),
    ("locking", {"unlock_at_step": 3}, r"locking\.unlock_at_step=3.*needs locking\.towers"),
    ("masking", {"image": 1.0}, r"masking\.image=1\.0.*\[0, 1\)"),
    ("similarity", "late", r"similarity='late'.*'pooled', 'filip'"),
    ("distill", {"source": "teacher"}, r"distill\.teacher.*needs the teacher run"),
    ("distill", {"source": "model"}, r"distill\.source='model'.*'none', 'teacher', 'data'"),
])
def test_bad_recipe_fields_name_the_field(group, values, pattern):
  config = tiny_config(**{group: values})
  with pytest.raises(ConfigError, match=pattern):
    recipes.validate(config)


# ---- FLIP -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_the_exact_number_of_patches(ratio):
  model = build_model(tiny_config(), VOCAB)
  batch = make_batch(0)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["image"], batch["text"])
  _, aux = model.apply(params, batch["image"], train=True, mask_ratio=ratio,
                       rngs={"mask": jax.random.PRNGKey(1)}, method=lambda m, x, **kw: m.img(x, **kw))
  n = 16  # 16x16 images, 4x4 patches.
  assert aux["tokens"].shape[1] == int(n * (1 - ratio)) == max(1, int(n * (1 - ratio)))


def test_text_masking_drops_padding_first_and_keeps_order():
  model = build_model(tiny_config(), VOCAB)
  tokens = jnp.array([[5, 6, 7, 1, 0, 0, 0, 0], [9, 8, 7, 6, 5, 4, 3, 1]], jnp.int32)
  params = model.init(jax.random.PRNGKey(0), make_batch(0)["image"][:2], tokens)
  _, aux = model.apply(params, tokens, train=True, mask_ratio=0.5,
                       rngs={"mask": jax.random.PRNGKey(2)}, method=lambda m, t, **kw: m.txt(t, **kw))
  mask = np.asarray(aux["mask"])
  assert mask.shape == (2, 4)
  assert mask[0].all()  # Four real tokens, four padding: exactly the padding went.
  assert mask[1].all()


def test_evaluation_is_unmasked_and_masking_ends_for_the_tuning_phase():
  config = tiny_config(masking={"image": 0.75, "text": 0.5, "unmasked_steps": 2})
  assert recipes.phase_at(config, 4) == recipes.Phase((), 0.75, 0.5)
  assert recipes.phase_at(config, 5) == recipes.Phase((), 0.0, 0.0)
  model = build_model(config, VOCAB)
  batch = make_batch(0)
  params = model.init(jax.random.PRNGKey(0), batch["image"], batch["text"])
  plain = model.apply(params, batch["image"], method="encode_image")
  # Not training: the mask ratio is ignored (what the evaluators' encoders see).
  zimg, _, _ = model.apply(params, batch["image"], batch["text"], train=False, image_mask=0.75)
  np.testing.assert_array_equal(plain, zimg)
  history, _, metrics = run(config, 2)
  assert np.isfinite(metrics["loss"])


# ---- distillation ---------------------------------------------------------------------------

def _np_kl_rows(t, s):
  pt = np.exp(t - t.max(1, keepdims=True))
  pt /= pt.sum(1, keepdims=True)
  ls = s - s.max(1, keepdims=True)
  ls = ls - np.log(np.exp(ls).sum(1, keepdims=True))
  lt = np.log(pt)
  return np.mean(np.sum(pt * (lt - ls), axis=1))


def test_distillation_loss_matches_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 6, 6)) * 3
  want = 0.5 * (_np_kl_rows(t, s) + _np_kl_rows(t.T, s.T))
  np.testing.assert_allclose(losses.distillation_loss(jnp.asarray(s), jnp.asarray(t)), want,
                             rtol=1e-5)


def test_student_identical_to_teacher_has_zero_distillation_loss_and_gradient():
  config = tiny_config()
  mesh, spec, state, _ = setup(config)
  batch = train_step.global_batch(make_batch(1), mesh)
  plain = train_step.make_grad_fn(spec.model, "sigmoid", mesh)
  distilled = train_step.make_grad_fn(spec.model, "sigmoid", mesh, options=train_step.StepOptions(
      distill_source="teacher", distill_weight=1.0, teacher=spec.model))
  rng = jax.random.PRNGKey(0)
  loss0, g0, _ = jax.jit(plain)(state["params"], batch, rng)
  loss1, g1, (_, _, _, stats) = jax.jit(distilled)(state["params"], batch, rng, state["params"])
  assert abs(float(stats["distill_loss"])) < 1e-6
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_stored_teacher_embeddings_give_the_teacher_runs_loss():
  config = tiny_config()
  mesh, spec, state, _ = setup(config)
  host = make_batch(1)
  zimg, ztxt, out = spec.model.apply({"params": state["params"]}, host["image"], host["text"])
  stored = dict(host, teacher_zimg=np.asarray(zimg), teacher_ztxt=np.asarray(ztxt),
                teacher_scale=np.full(len(zimg), float(out["scale"]), np.float32))
  teacher = train_step.StepOptions(distill_source="teacher", distill_weight=2.0,
                                   teacher=spec.model)
  data = train_step.StepOptions(distill_source="data", distill_weight=2.0)
  # The student differs from the teacher: one step of training.
  _, state2, _ = run(config, 1)
  params = state2["params"]
  rng = jax.random.PRNGKey(0)
  fa = train_step.make_grad_fn(spec.model, "sigmoid", mesh, options=teacher)
  fb = train_step.make_grad_fn(spec.model, "sigmoid", mesh, options=data)
  la, _, (_, _, _, sa) = jax.jit(fa)(params, train_step.global_batch(host, mesh), rng,
                                     state["params"])
  lb, _, (_, _, _, sb) = jax.jit(fb)(params, train_step.global_batch(stored, mesh), rng)
  assert float(sa["distill_loss"]) > 1e-4
  np.testing.assert_allclose(sb["distill_loss"], sa["distill_loss"], rtol=1e-4)
  np.testing.assert_allclose(lb, la, rtol=1e-5)


# ---- every recipe config through the CLI -----------------------------------------------------

def _cli_env():
  """The environment of this module's command-line runs: two simulated devices."""
  return dict(os.environ, XLA_FLAGS=xla_flags(2), BIG_VLP_HUGEPAGES="0")


def _train_cli(config_arg, workdir, timeout=600):
  env = _cli_env()
  proc = subprocess.run([sys.executable, "-m", "big_vlp.train", "--config", config_arg,
                         "--workdir", workdir], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f], proc.stdout


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shapes_dir):  # noqa: F811
  workdir = str(tmp_path_factory.mktemp("base"))
  events, _ = _train_cli(_demo("demo", shapes_dir, "steps=8"), workdir)
  return workdir, events


def _demo(name, data_dir, extra=""):
  arg = (f"runlocal,data={SMALL},eval_data={SMALL},data_dir={data_dir},tokenizer=bytes,"
         f"batch=16" + ("," + extra if extra else ""))
  return os.path.join(ROOT, "configs", f"{name}.py") + ":" + arg


@pytest.mark.parametrize("name,extra,check", [
    # LiT through the CLI: initialised from the base run, locked, then unlocked at step 4
    # (test_locked_tower_runs_in_inference_mode_without_gradient checks locking itself).
    ("lit_demo", "steps=6,init={base},unlock_at=3", "unlock"),
    ("flip_demo", "steps=6,image_mask=0.75,text_mask=0.25,unmasked_steps=2", "flip"),
    ("filip_demo", "steps=6", "filip"),
    ("distill_demo", "steps=6,teacher={base}", "distill"),
    ("coca_demo", "steps=6", "coca"),
    ("cappa_demo", "steps=6", "cappa"),
    ("silc_demo", "steps=6", "silc"),
])
def test_recipe_config_trains_through_the_cli(tmp_path, shapes_dir, base_run, name, extra,  # noqa: F811
                                              check):
  base, _ = base_run
  extra = extra.format(base=base) + ",eval_every=0"  # Evaluators at the end only.
  events, stdout = _train_cli(_demo(name, shapes_dir, extra), str(tmp_path / "wd"))
  train_events = [e for e in events if "train/loss" in e]
  assert train_events[-1]["step"] == 6
  assert all(np.isfinite(e["train/loss"]) for e in train_events)
  final = {k: v for e in events for k, v in e.items()}
  assert 0 <= final["zeroshot/top1"] <= 1
  assert ("retrieval/i2t_r1" in final) == (check != "cappa")  # CapPa has no text tower.
  if check in ("coca", "cappa"):  # Captions of the held-out split, scored.
    assert 0 <= final["captioning/bleu4"] <= 1 and final["captioning/cider"] >= 0
    assert all(e["train/caption_loss"] > 0 for e in train_events)
    assert ("train/contrastive_loss" in train_events[-1]) == (check == "coca")
  if check == "silc":
    assert all(e["train/silc_loss"] > 0 for e in train_events)
    assert train_events[-1]["train/ema_momentum"] == pytest.approx(0.99)
  if check == "unlock":
    assert f"initialised img from {base}" in stdout
    assert "step 4: recipe phase" in stdout
  if check == "flip":
    assert "step 5: recipe phase" in stdout  # The unmasked tuning phase.
  if check == "distill":
    assert all(e["train/distill_loss"] >= 0 for e in train_events)
    assert "train/contrastive_loss" in train_events[-1]


def test_lit_init_from_a_mismatched_run_names_the_path(tmp_path, shapes_dir, base_run):  # noqa: F811
  base, _ = base_run
  env = _cli_env()
  arg = _demo("lit_demo", shapes_dir, f"steps=2,init={base}")
  proc = subprocess.run([sys.executable, "-m", "big_vlp.train", "--config", arg,
                         "--config.model.image.width=32", "--workdir", str(tmp_path / "wd")],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode != 0
  assert "img/" in proc.stderr and "init" in proc.stderr


# ---- FILIP in the step --------------------------------------------------------------------

def test_filip_step_sharded_equals_global():
  config = tiny_config(similarity="filip")
  mesh, spec, state, _ = setup(config)
  assert mesh.size == 8
  batch = train_step.global_batch(make_batch(1), mesh)
  opts = train_step.StepOptions(similarity="filip")
  rng = jax.random.PRNGKey(0)
  out = [jax.jit(train_step.make_grad_fn(spec.model, "sigmoid", mesh, impl, options=opts))(
      state["params"], batch, rng) for impl in ("global", "sharded")]
  (la, ga, (_, _, _, sa)), (lb, gb, (_, _, _, sb)) = out
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  np.testing.assert_allclose(sb["pos_logit"], sa["pos_logit"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)
  assert any(np.any(g) for g in jax.tree.leaves(ga["img"]))


def test_distillation_from_stored_embeddings_trains_through_the_cli(tmp_path, shapes_dir,  # noqa: F811
                                                                    base_run):
  base, _ = base_run
  out_dir = str(tmp_path / "tfds")
  env = _cli_env()
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "teacher_embeddings.py"), "--teacher", base,
       "--data", SMALL, "--data_dir", shapes_dir, "--splits", "train,val",
       "--out_name", "shapes_teacher", "--out_dir", out_dir],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  arg = (os.path.join(ROOT, "configs", "distill_demo.py") + ":runlocal,source=data,steps=4,"
         f"batch=16,data=shapes_teacher,data_dir={out_dir},eval_data={SMALL},"
         f"eval_data_dir={shapes_dir},tokenizer=bytes")
  events, _ = _train_cli(arg, str(tmp_path / "wd"))
  train_events = [e for e in events if "train/loss" in e]
  assert train_events[-1]["step"] == 4
  # The stored teacher's similarities differ from the fresh student's: a positive KL.
  assert all(e["train/distill_loss"] > 0 for e in train_events)
  final = {k: v for e in events for k, v in e.items()}
  assert 0 <= final["retrieval/i2t_r1"] <= 1
