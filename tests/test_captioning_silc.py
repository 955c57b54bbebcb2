"""Recipes II through the one trainer: captioning (CoCa: contrastive + captioning; CapPa:
captioning only) and SILC (EMA teacher, DINO self-distillation of local crops).

Library pieces (decoder, decoding, DINO loss, EMA formula, multi-crop op) are covered in
test_decoder.py and test_silc.py; this file checks how the train step, train state,
checkpoints, config validation and the trainer use them.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from big_vlp import ema as ema_lib
from big_vlp import recipes, sharding, train_step
from big_vlp.config_errors import ConfigError
from big_vlp.run_setup import PhasedSteps, check_batch_keys, check_decoder
from big_vlp.train import train
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)
from test_recipes import make_batch, run, setup, tiny_config
from test_train_e2e import final_params, load_config, read_metrics

DECODER = {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "max_len": 8}
HEAD = {"num_prototypes": 32, "hidden_dim": 16, "bottleneck_dim": 8, "num_layers": 2}


def coca_config(weight=2.0):
  c = tiny_config(caption={"weight": weight})
  c.model.decoder = dict(DECODER)
  return c


def cappa_config(parallel_prob=0.75):
  c = coca_config()
  c.model.text = None
  c.model.embed_dim = None
  c.caption.parallel_prob = parallel_prob
  return c


def silc_config(**silc):
  return tiny_config(silc={"weight": 1.0, "head": dict(HEAD), "ema_momentum": 0.9,
                           "ema_momentum_end": 0.9, "teacher_temp_end": 0.06, **silc})


def silc_batch(seed):
  batch = make_batch(seed)
  rng = np.random.default_rng(100 + seed)
  batch[recipes.SILC_LOCAL] = rng.normal(size=(16, 3, 8, 8, 3)).astype(np.float32)
  batch[recipes.SILC_GLOBAL] = rng.normal(size=(16, 2, 16, 16, 3)).astype(np.float32)
  return batch


def grad_fn_outputs(config, batch):
  mesh, spec, state, _ = setup(config, batch)
  opts = train_step.StepOptions(
      contrastive=recipes.contrastive_on(config),
      caption_weight=float(config.caption.weight),
      parallel_prob=float(config.caption.parallel_prob))
  fn = train_step.make_grad_fn(spec.model, config.loss, mesh, options=opts)
  out = jax.jit(fn)(state["params"], train_step.global_batch(batch, mesh), jax.random.PRNGKey(1))
  return spec, state, out


def test_coca_objective_is_contrastive_plus_weighted_caption_loss():
  spec, state, (loss, grads, (_, _, _, stats)) = grad_fn_outputs(coca_config(2.0), make_batch(1))
  assert set(state["params"]) >= {"img", "txt", "dec"}
  np.testing.assert_allclose(loss, stats["contrastive_loss"] + 2.0 * stats["caption_loss"],
                             rtol=1e-6)
  # A fresh decoder's logits are zero (zero-init output layer): loss log(V) per token.
  np.testing.assert_allclose(stats["caption_loss"], np.log(spec.model.decoder["vocab_size"]),
                             rtol=1e-5)
  for tower in ("img", "txt", "dec"):  # Both losses reach all three parts.
    assert any(np.any(g) for g in jax.tree.leaves(grads[tower])), tower


def test_cappa_has_no_text_tower_and_trains_by_captioning_only():
  config = cappa_config()
  spec, state, (loss, grads, (_, ztxt, _, stats)) = grad_fn_outputs(config, make_batch(1))
  assert "txt" not in state["params"] and ztxt is None
  np.testing.assert_allclose(loss, stats["caption_loss"], rtol=1e-6)
  assert "contrastive_loss" not in stats
  # The zero-init output layer gets the only gradient of step 1; from step 2 on the image
  # tower learns through the decoder's cross-attention.
  assert any(np.any(g) for g in jax.tree.leaves(grads["dec"]["logits"]))
  history, _, metrics = run(config, 2)
  assert not np.array_equal(history[1]["img"]["embedding"]["kernel"],
                            history[2]["img"]["embedding"]["kernel"])
  assert "scale" not in metrics and np.isfinite(metrics["caption_loss"])
  with pytest.raises(ValueError, match="no text tower"):
    spec.model.apply({"params": state["params"]}, make_batch(1)["text"], method="encode_text")


def _silc_steps(config, batches):
  mesh, spec, state, keys = setup(config, batches[0])
  phased = PhasedSteps(config, spec, mesh, keys)
  states = [jax.device_get(state)]
  for s, batch in enumerate(batches, 1):
    state, metrics = phased.for_step(s)(state, train_step.global_batch(batch, mesh))
    states.append(jax.device_get(state))
  return spec, states, metrics


def test_ema_teacher_and_centre_follow_their_formulas():
  config = silc_config(center_momentum=0.8)
  batches = [silc_batch(s) for s in (1, 2)]
  spec, states, metrics = _silc_steps(config, batches)
  s0, s1, s2 = states
  # The teacher starts as the student's image tower and DINO head.
  for k in train_step.EMA_SUBTREES:
    jax.tree.map(np.testing.assert_array_equal, s0["ema"][k], s0["params"][k])
  for prev, cur, step in ((s0, s1, 0), (s1, s2, 1)):
    m = float(ema_lib.ema_momentum(step, config.total_steps, 0.9, 0.9))
    for k in train_step.EMA_SUBTREES:
      expect = jax.tree.map(lambda t, p: m * np.asarray(t, np.float64) +
                            (1 - m) * np.asarray(p, np.float64), prev["ema"][k], cur["params"][k])
      jax.tree.map(lambda e, a: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7),
                   expect, cur["ema"][k])
  # Centre after step 1: 0.8 * 0 + 0.2 * mean of the teacher's logits on the global crops.
  teacher = {**s0["params"], **s0["ema"]}
  crops = batches[0][recipes.SILC_GLOBAL].reshape(-1, 16, 16, 3)
  logits = np.asarray(spec.model.apply({"params": teacher}, crops, method="dino_logits"))
  np.testing.assert_allclose(s1["center"], 0.2 * logits.mean(axis=0), rtol=1e-4, atol=1e-6)
  assert float(metrics["silc_loss"]) > 0 and "contrastive_loss" in metrics
  assert not np.array_equal(s2["ema"]["img"]["embedding"]["kernel"],
                            s2["params"]["img"]["embedding"]["kernel"])


def test_silc_loss_matches_dino_loss_of_the_views():
  config = silc_config()
  batch = silc_batch(3)
  mesh, spec, state, _ = setup(config, batch)
  fn = train_step.make_grad_fn(spec.model, "sigmoid", mesh, options=train_step.StepOptions(
      silc=train_step.silc_options(config)))
  params = state["params"]
  center = jnp.full((HEAD["num_prototypes"],), 0.01)
  _, _, (_, _, out, stats) = jax.jit(fn)(params, train_step.global_batch(batch, mesh),
                                         jax.random.PRNGKey(0), None,
                                         (state["ema"], center, jnp.int32(0)))
  apply = lambda x: np.asarray(spec.model.apply({"params": params}, x, method="dino_logits"))
  local = batch[recipes.SILC_LOCAL]
  student = apply(local.reshape(-1, 8, 8, 3)).reshape(16, 3, -1).transpose(1, 0, 2)
  teacher = apply(batch[recipes.SILC_GLOBAL].reshape(-1, 16, 16, 3)).reshape(
      16, 2, -1).transpose(1, 0, 2)
  np.testing.assert_allclose(out["silc_teacher"], teacher, rtol=1e-5, atol=1e-6)
  # NumPy DINO loss: every (global, local) pair, centred and sharpened teacher targets.
  # No warm-up configured: the teacher runs at its final temperature from step 0.
  t = np.exp((teacher - 0.01) / config.silc.teacher_temp_end)
  t /= t.sum(-1, keepdims=True)
  s = student / config.silc.student_temp
  m = s.max(-1, keepdims=True)
  logp = s - m - np.log(np.exp(s - m).sum(-1, keepdims=True))
  expect = np.mean([-(t[i] * logp[j]).sum(-1).mean() for i in range(2) for j in range(3)])
  np.testing.assert_allclose(stats["silc_loss"], expect, rtol=1e-4)


@pytest.mark.parametrize("mutate,pattern", [
    (lambda c: c.caption.update(parallel_prob=1.5), r"caption\.parallel_prob=1\.5.*\[0, 1\]"),
    (lambda c: setattr(c, "similarity", "filip"), r"similarity='filip'.*needs a text tower"),
    (lambda c: c.locking.update(towers=("txt",)), r"locking\.towers.*no text tower"),
    (lambda c: c.model.decoder.update(max_len=None), r"model\.decoder\.max_len.*must be set"),
])
def test_bad_captioning_fields_name_the_field(mutate, pattern):
  config = cappa_config()
  mutate(config)
  with pytest.raises(ConfigError, match=pattern):
    recipes.validate(config)


@pytest.mark.parametrize("silc,pattern", [
    ({"weight": -1.0}, r"silc\.weight=-1\.0.*non-negative"),
    ({"head": {"prototypes": 8}}, r"silc\.head\.prototypes.*allowed: num_prototypes"),
    ({"ema_momentum": 1.5}, r"silc\.ema_momentum=1\.5.*\[0, 1\]"),
    ({"teacher_temp": 0.0}, r"silc\.teacher_temp=0\.0.*positive"),
])
def test_bad_silc_fields_name_the_field(silc, pattern):
  config = silc_config()
  config.silc.update(silc)
  with pytest.raises(ConfigError, match=pattern):
    recipes.validate(config)


def test_silc_without_local_crops_and_decoder_pad_mismatch_are_refused():
  with pytest.raises(ConfigError, match=r"silc\.weight=1\.0.*'image_local'.*multi_crop"):
    check_batch_keys(silc_config(), ("image", "text"))

  class Tok:
    pad_id = 3
  with pytest.raises(ConfigError, match=r"model\.decoder\.pad_id=0.*pads with 3"):
    check_decoder(cappa_config(), Tok())


@pytest.mark.long
def test_silc_teacher_state_survives_checkpoint_resume_exactly(tmp_path, shapes_dir):  # noqa: F811
  config = load_config("silc_demo", f"runlocal,data={SMALL},eval_data={SMALL},"
                       f"data_dir={shapes_dir},tokenizer=bytes,steps=6,batch=16")
  config.ckpt_every = 3
  config.log_every = 1
  config.evals = {}
  train(config, str(tmp_path / "straight"))
  train(config, str(tmp_path / "resumed"), stop_at=4)  # Between checkpoints: 3 saved, 4 too.
  train(config, str(tmp_path / "resumed"))
  step_a, a = final_params(config, str(tmp_path / "straight"))
  step_b, b = final_params(config, str(tmp_path / "resumed"))
  assert step_a == step_b == 6
  assert set(a) >= {"ema", "center"}
  jax.tree.map(np.testing.assert_array_equal, a, b)  # Bitwise: teacher, centre, params, ...
  assert np.any(a["center"]) and not all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a["ema"]["img"]),
                                           jax.tree.leaves(a["params"]["img"])))
  losses_a = {m["step"]: m["train/silc_loss"] for m in read_metrics(str(tmp_path / "straight"))}
  losses_b = {m["step"]: m["train/silc_loss"] for m in read_metrics(str(tmp_path / "resumed"))}
  assert losses_a == losses_b and len(losses_a) == 6


@pytest.mark.long
def test_greedy_captions_of_a_trained_captioner_match_their_images(tmp_path, shapes_dir):  # noqa: F811
  """A captioner trained 600 steps through train() (the CapPa config, autoregressive only,
  small): its greedy captions of held-out images score far higher against their own
  references than against another image's (the chance level of a decoder that had learned
  only the caption templates)."""
  from big_vlp import pretrained  # pylint: disable=import-outside-toplevel
  from big_vlp.evaluators import build_evaluators  # pylint: disable=import-outside-toplevel
  from big_vlp.evaluators.caption_metrics import caption_metrics  # pylint: disable=import-outside-toplevel
  from big_vlp.run_setup import make_tokenizer  # pylint: disable=import-outside-toplevel
  config = load_config("cappa_demo", f"data={SMALL},eval_data={SMALL},data_dir={shapes_dir},"
                       "steps=600,batch=32,res=32,dec_depth=1,parallel_prob=0")
  config.model.image.update(width=64, depth=2, mlp_dim=256, num_heads=2)
  config.model.decoder.update(width=64, mlp_dim=256, num_heads=2)
  config.optim.lr = 3e-3
  config.evals.captioning.every = 0  # At the end only.
  del config.evals["zeroshot"]
  results = train(config, str(tmp_path / "wd"))
  mesh = sharding.mesh_from_config(config)
  run = pretrained.load_run(str(tmp_path / "wd"), mesh=mesh)
  tokenizer = make_tokenizer(config, str(tmp_path / "wd"))  # The run's, trained on its data.
  evaluator = build_evaluators(config, run.model, tokenizer, mesh)["captioning"]
  hyps, refs = evaluator.captions(run.params)
  matched = caption_metrics(hyps, refs)
  assert matched["bleu4"] == pytest.approx(results["captioning/bleu4"])
  shuffled = caption_metrics(hyps, refs[1:] + refs[:1])
  # Each caption's wording is drawn at random from several templates, so exact matches stay
  # rare; CIDEr weighs the words that set images apart (colours, shapes, places). Measured:
  # 0.86 against the own references vs 0.44 against the neighbour's.
  assert matched["cider"] > 1.5 * shuffled["cider"] and matched["cider"] > 0.6
  assert matched["bleu4"] > shuffled["bleu4"]
