"""Caption metrics (BLEU-4, CIDEr-D, exact match) against hand-worked values, and the
'captioning' evaluator and likelihood zero-shot (CapPa) on a tiny captioner over the
shapes dataset."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vlp import sharding
from big_vlp.config_errors import ConfigError
from big_vlp.data import pipeline, shapes
from big_vlp.data.tokenizers import ByteTokenizer
from big_vlp.evaluators import build_evaluators, caption_metrics as cm
from big_vlp.evaluators.captioning import Captioning, reference_sets
from big_vlp.evaluators.common import Encoders, eval_batches
from big_vlp.evaluators.zeroshot import ZeroShot
from big_vlp.losses_caption import sequence_logprob
from big_vlp.models import decoding
from big_vlp.models.decoder import shift_right
from big_vlp.models.two_towers import TwoTower
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)

# ---- metrics -------------------------------------------------------------------------------


def test_tokenize_and_exact_match():
  assert cm.tokenize("A small, red Circle.") == ["a", "small", "red", "circle"]
  hyps = ["A small red circle.", "a red square", "a blue ring"]
  refs = [["a small red circle"], ["a big red square", "red square"], ["a blue  ring!"]]
  assert cm.exact_match(hyps, refs) == pytest.approx(2 / 3)


def test_bleu_perfect_match_is_one():
  refs = [["an image with a small red circle"], ["a blue ring in the top left"]]
  assert cm.bleu([r[0] for r in refs], refs) == pytest.approx(1.0)


def test_bleu_known_precisions():
  # Hypothesis 1 vs its reference: unigrams 5/6 (sat unmatched), bigrams 3/5 (the cat,
  # on the, the mat), trigrams 1/4 (on the mat), 4-grams 0/3. Hypothesis 2 matches fully:
  # 4/4, 3/3, 2/2, 1/1. Lengths 6 + 4 = 10 = reference lengths, so no brevity penalty.
  hyps = ["the cat sat on the mat", "a small red circle"]
  refs = [["the cat is on the mat"], ["a small red circle"]]
  expected = (9 / 10 * 6 / 8 * 3 / 6 * 1 / 4) ** 0.25
  assert cm.bleu(hyps, refs) == pytest.approx(expected)
  # Alone, hypothesis 1 has no matching 4-gram: BLEU-4 is 0 (no smoothing).
  assert cm.bleu(hyps[:1], refs[:1]) == 0.0


def test_bleu_brevity_penalty_uses_closest_reference():
  # c = 4; reference lengths 8 and 7 -> r = 7; every precision is 1.
  refs = [["a small red circle in the top left", "a small red circle at the top"]]
  assert cm.bleu(["a small red circle"], refs) == pytest.approx(math.exp(1 - 7 / 4))
  # Ties go to the shorter reference: lengths 6 and 2 around c = 4 -> r = 2 <= c, BP = 1.
  refs = [["a small red circle at top", "a small"]]
  assert cm.bleu(["a small red circle"], refs) == pytest.approx(1.0)


def test_cider_hand_worked():
  # Two images, so log N = log 2 = L. 'a' is in both reference sets: IDF 0; every other
  # n-gram has df <= 1: weight L.
  refs = [["a red circle"], ["a blue square"]]
  # Image 2, identical: n = 1, 2, 3 cosines 1, no 4-grams: (1 + 1 + 1 + 0) / 4 * 10 = 7.5.
  # Image 1, 'a red square': unigram vectors {a: 0, red: L, square: L} vs {a: 0, red: L,
  # circle: L} -> L^2 / (sqrt2 L)^2 = 0.5; bigrams {a red, red square} vs {a red, red
  # circle} -> 0.5; trigrams differ -> 0. (0.5 + 0.5) / 4 * 10 = 2.5.
  assert cm.cider_d(["a red square", "a blue square"], refs) == pytest.approx((2.5 + 7.5) / 2)
  # Length penalty on bigram counts: 'a red' has 1 bigram, the reference 2 -> delta -1.
  # Unigrams {a: 0, red: L} (norm L) vs norm sqrt2 L: 1/sqrt2; bigrams {a red}: 1/sqrt2.
  expected = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
  got = cm.cider_d(["a red", "a blue square"], refs)
  assert got == pytest.approx((expected + 7.5) / 2)


def test_cider_identical_four_word_captions_score_ten():
  refs = [["a small red circle"], ["one big blue square"], ["the green ring here"]]
  assert cm.cider_d([r[0] for r in refs], refs) == pytest.approx(10.0)
  # Two references, the hypothesis equal to one and sharing nothing with the other: the
  # mean over references halves it.
  refs = [["a small red circle", "xx yy"], ["one big blue square"]]
  assert cm.cider_d(["a small red circle", "one big blue square"], refs) == pytest.approx(
      (10.0 / 2 + 10.0) / 2)


def test_metrics_reject_mismatched_inputs():
  with pytest.raises(ValueError, match="2 hypotheses but 1"):
    cm.caption_metrics(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="non-empty list"):
    cm.bleu(["a"], ["a"])


def test_reference_sets():
  assert reference_sets(np.array([b"a b", b"c"], object)) == [["a b"], ["c"]]
  assert reference_sets(np.array([[b"a", b""], [b"b", b"c"]], object)) == [["a"], ["b", "c"]]


# ---- evaluators on a tiny captioner --------------------------------------------------------

TOK = ByteTokenizer()
MAX_LEN = 24
IMAGE = {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "patch_size": 8,
         "pool_type": "gap"}
DECODER = {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "max_len": MAX_LEN,
           "vocab_size": TOK.vocab_size, "pad_id": 0}
PP = "decode|resize(16)|value_range(-1,1)"
TEMPLATES = ["{}", "a {}."]


def tiny_model(decoder=DECODER, text=None):
  return TwoTower(image=IMAGE, text=text, decoder=decoder, bias_init=None)


@pytest.fixture(scope="module")
def model_params():
  model = tiny_model()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)),
                      jnp.zeros((2, MAX_LEN), jnp.int32), method="init_all")["params"]
  # The logits layer starts at zero (every token equally likely); random weights make the
  # scores depend on the image and the prefix.
  rng = np.random.default_rng(0)
  dense = dict(params["dec"]["logits"])
  dense["kernel"] = jnp.asarray(rng.normal(0, 1.0, dense["kernel"].shape), jnp.float32)
  dense["bias"] = jnp.asarray(rng.normal(0, 1.0, dense["bias"].shape), jnp.float32)
  params = {**params, "dec": {**params["dec"], "logits": dense}}
  return model, params


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def eval_cfg(data_dir, **fields):
  return ml_collections.ConfigDict({"data": SMALL, "split": "val[:20]", "data_dir": data_dir,
                                    "batch_size": 16, **fields})


def test_captioning_evaluator(model_params, mesh, shapes_dir):  # noqa: F811
  model, params = model_params
  encoders = Encoders(model, mesh)
  cfg = eval_cfg(shapes_dir, type="captioning", pp=PP + "|keep('image','caption')",
                 max_len=12, num_examples_shown=2)
  ev = Captioning("cap", cfg, encoders=encoders, tokenizer=TOK, text_len=MAX_LEN,
                  data=pipeline)
  hyps, refs = ev.captions(params)
  assert len(hyps) == len(refs) == 20
  # One reference each, the stored captions of the split (stored in shuffled order).
  val_captions = {shapes.render_split_example("val", i)[1] for i in range(200)}
  assert all(len(r) == 1 and r[0] in val_captions for r in refs)
  # The sharded, jitted decode equals greedy decoding with the model applied directly.
  images = np.concatenate([b["image"] for b in eval_batches(pipeline, cfg, TOK)])
  ctx = model.apply({"params": params}, images, method="image_context")
  ids = jax.jit(lambda p, c: decoding.greedy_decode(
      lambda t, x: model.apply({"params": p}, t, x, method="caption_logits"), c,
      max_len=12, bos_id=0, eos_id=TOK.eos_id, pad_id=0))(params, ctx)
  assert hyps == [TOK.decode(row) for row in np.asarray(ids)]
  out = ev.run(params)
  assert set(out) == {"exact_match", "bleu4", "cider"}
  assert out == cm.caption_metrics(hyps, refs)
  assert 0 <= out["exact_match"] <= 1 and 0 <= out["bleu4"] <= 1 and out["cider"] >= 0

  beam = Captioning("cap", eval_cfg(shapes_dir, type="captioning", decode="beam",
                                    beam_size=2, max_len=6,
                                    pp=PP + "|keep('image','caption')"),
                    encoders=encoders, tokenizer=TOK, text_len=MAX_LEN, data=pipeline)
  beam_hyps, _ = beam.captions(params)
  assert len(beam_hyps) == 20 and all(len(h) <= 6 for h in beam_hyps)


def test_likelihood_zeroshot_matches_direct_sequence_logprob(model_params, mesh,
                                                            shapes_dir):  # noqa: F811
  model, params = model_params
  cfg = eval_cfg(shapes_dir, type="zeroshot", pp=PP + "|keep('image','label')",
                 templates=TEMPLATES)
  zs = ZeroShot("zs", cfg, encoders=Encoders(model, mesh), tokenizer=TOK, text_len=MAX_LEN,
                data=pipeline)
  assert zs.scoring == "likelihood"  # 'auto' without a text tower.
  batch = next(eval_batches(pipeline, cfg, TOK))
  images = batch["image"][:5]
  scores = zs.likelihood_scores(params, images)
  classes = zs.class_names
  assert scores.shape == (5, len(classes))

  # Direct: every (image, prompt) pair through the decoder, no chunks, no sharding.
  prompts = TOK.encode([t.format(c) for c in classes for t in TEMPLATES], MAX_LEN)
  ctx = model.apply({"params": params}, images, method="image_context")
  targets = jnp.tile(jnp.asarray(prompts), (5, 1))  # Row i * P + p: image i, prompt p.
  logits = model.apply({"params": params}, shift_right(targets, 0),
                       jnp.repeat(ctx, len(prompts), axis=0), method="caption_logits")
  expected = np.asarray(sequence_logprob(logits, targets, 0))
  expected = expected.reshape(5, len(classes), len(TEMPLATES)).mean(axis=2)
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
  # Tiny chunks (one prompt at a time) give the same scores.
  small = zs.encoders.text_logprobs(params, images, prompts, budget=1)
  np.testing.assert_allclose(small.reshape(5, len(classes), -1).mean(axis=2), expected,
                             rtol=1e-4, atol=1e-4)

  out = zs.run(params)
  assert set(out) == {"top1", "top5", "mean_per_class_recall"}
  assert all(0 <= v <= 1 for v in out.values())


def test_likelihood_zeroshot_ranks_by_prompt_probability(model_params, mesh,
                                                         shapes_dir):  # noqa: F811
  # A decoder whose logits ignore the image and the prefix (zero kernel): log p(token) is
  # log_softmax(bias) at every position, so every image's best class is the one whose
  # prompts' tokens (and EOS) the bias favours, computed here with NumPy.
  model, params = model_params
  rng = np.random.default_rng(3)
  bias = rng.normal(0, 3.0, TOK.vocab_size).astype(np.float32)
  dense = {"kernel": jnp.zeros_like(params["dec"]["logits"]["kernel"]),
           "bias": jnp.asarray(bias)}
  params = {**params, "dec": {**params["dec"], "logits": dense}}
  cfg = eval_cfg(shapes_dir, type="zeroshot", pp=PP + "|keep('image','label')",
                 templates=TEMPLATES, scoring="likelihood")
  zs = ZeroShot("zs", cfg, encoders=Encoders(model, mesh), tokenizer=TOK, text_len=MAX_LEN,
                data=pipeline)
  logp = bias - np.log(np.sum(np.exp(bias - bias.max()))) - bias.max()
  expected = np.array([np.mean([sum(logp[b + 2] for b in t.format(c).lower().encode())
                                + logp[TOK.eos_id] for t in TEMPLATES])
                       for c in zs.class_names])
  best = int(np.argmax(expected))
  labels = np.concatenate([b["label"] for b in eval_batches(pipeline, cfg, TOK)])
  out = zs.run(params)
  assert out["top1"] == pytest.approx(np.mean(labels == best))
  images = next(eval_batches(pipeline, cfg, TOK))["image"][:3]
  np.testing.assert_allclose(zs.likelihood_scores(params, images),
                             np.broadcast_to(expected, (3, len(expected))), rtol=1e-4)


def test_config_errors(mesh, shapes_dir):  # noqa: F811
  text = {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2, "max_len": 8,
          "vocab_size": TOK.vocab_size, "pool_type": "last"}
  clip = Encoders(TwoTower(image=IMAGE, text=text, embed_dim=16), mesh)
  cap_cfg = eval_cfg(shapes_dir, type="captioning", pp=PP + "|keep('image','caption')")
  with pytest.raises(ConfigError, match=r"config\.evals\.cap\.type='captioning'.*no"):
    Captioning("cap", cap_cfg, encoders=clip, tokenizer=TOK, text_len=8, data=pipeline)
  zs_cfg = eval_cfg(shapes_dir, type="zeroshot", pp=PP + "|keep('image','label')",
                    scoring="likelihood")
  with pytest.raises(ConfigError, match=r"config\.evals\.zs\.scoring='likelihood'"):
    ZeroShot("zs", zs_cfg, encoders=clip, tokenizer=TOK, text_len=8, data=pipeline)
  zs_cfg.scoring = "loglik"
  with pytest.raises(ConfigError, match=r"config\.evals\.zs\.scoring='loglik'.*'auto'"):
    ZeroShot("zs", zs_cfg, encoders=clip, tokenizer=TOK, text_len=8, data=pipeline)
  zs_cfg.scoring = "auto"
  assert ZeroShot("zs", zs_cfg, encoders=clip, tokenizer=TOK, text_len=8,
                  data=pipeline).scoring == "embedding"

  cappa = Encoders(tiny_model(), mesh)
  zs_cfg.scoring = "embedding"
  with pytest.raises(ConfigError, match=r"config\.evals\.zs\.scoring='embedding'.*text"):
    ZeroShot("zs", zs_cfg, encoders=cappa, tokenizer=TOK, text_len=8, data=pipeline)
  for field, value, match in (("decode", "sample", r"evals\.cap\.decode='sample'"),
                              ("max_len", 99, r"evals\.cap\.max_len=99"),
                              ("beam_size", 0, r"evals\.cap\.beam_size=0")):
    bad = eval_cfg(shapes_dir, type="captioning", pp="", **{field: value})
    with pytest.raises(ConfigError, match=match):
      Captioning("cap", bad, encoders=cappa, tokenizer=TOK, text_len=8, data=pipeline)
  bad_pad = Encoders(tiny_model({**DECODER, "pad_id": 5}), mesh)
  with pytest.raises(ConfigError, match=r"model\.decoder\.pad_id=5"):
    Captioning("cap", cap_cfg, encoders=bad_pad, tokenizer=TOK, text_len=8, data=pipeline)


def test_build_evaluators_without_text_tower(mesh, shapes_dir):  # noqa: F811
  config = ml_collections.ConfigDict({
      "model": {"image": IMAGE, "text": None, "decoder": DECODER},
      "evals": {"captioning": eval_cfg(shapes_dir, type="captioning", pp=""),
                "zeroshot": eval_cfg(shapes_dir, type="zeroshot", pp="")}})
  evs = build_evaluators(config, tiny_model(), TOK, mesh)
  assert isinstance(evs["captioning"], Captioning)
  assert evs["zeroshot"].scoring == "likelihood" and evs["zeroshot"].text_len == MAX_LEN
