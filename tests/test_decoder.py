"""Captioning pieces: TextDecoder masking, caption losses, greedy / beam decoding, learning."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from big_vlp.config_errors import ConfigError
from big_vlp.losses_caption import caption_loss, sequence_logprob
from big_vlp.models.decoder import TextDecoder, sample_parallel, self_attention_mask, shift_right
from big_vlp.models.decoding import beam_search, greedy_decode
from big_vlp.models.vit import ViT

# The byte-level tokenizer's layout: pad 0, EOS 1, no BOS (BOS reuses the pad id).
PAD, EOS, BOS = 0, 1, 0
VOCAB, LEN = 16, 8
RNG = jax.random.PRNGKey(0)
TINY = dict(vocab_size=VOCAB, max_len=LEN, width=32, depth=2, mlp_dim=64, num_heads=2)


def tokens_batch(lengths, seed=0):
  """Decoder inputs: BOS, then random tokens, EOS, padding; one row per real length."""
  rng = np.random.default_rng(seed)
  toks = np.full((len(lengths), LEN), PAD, np.int32)
  for i, n in enumerate(lengths):
    toks[i, 1:n] = rng.integers(2, VOCAB, n - 1)
    toks[i, n] = EOS
  return jnp.asarray(toks)


def image_tokens(batch=4, width=24, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, 5, width))


@functools.cache
def tiny_params(**overrides):
  """Params of the TINY decoder, with random (not zero) output weights so logits vary."""
  model = TextDecoder(**TINY, **overrides)
  params = model.init(RNG, tokens_batch([3, 7, 5, 1]), image_tokens())
  flat = flatten_dict(params["params"])
  key = ("logits", "kernel")
  if key in flat:
    flat[key] = jax.random.normal(jax.random.PRNGKey(2), flat[key].shape)
  return model, {"params": unflatten_dict(flat)}


# ---------------------------------------------------------------- the decoder


def test_shapes_params_and_dtypes():
  model, params = tiny_params()
  logits = model.apply(params, tokens_batch([3, 7, 5, 1]), image_tokens())
  assert logits.shape == (4, LEN, VOCAB) and logits.dtype == jnp.float32
  names = flatten_dict(params["params"], sep="/")
  assert names["mask_embedding"].shape == (1, 1, 32)
  assert names["image_proj/kernel"].shape == (24, 32)  # 24-wide image tokens -> width 32
  assert names["logits/kernel"].shape == (32, VOCAB)
  assert "decoderblock_1/CrossAttention/key/kernel" in names
  assert "decoderblock_1/MlpBlock_0/Dense_0/kernel" in names  # sharding rules match it
  tied = TextDecoder(**TINY, tie_embedding=True, dtype="bfloat16")
  p = tied.init(RNG, tokens_batch([3, 7, 5, 1]), image_tokens(width=32))
  names = flatten_dict(p["params"], sep="/")
  assert "logits/kernel" not in names and "image_proj/kernel" not in names
  out = tied.apply(p, tokens_batch([3, 7, 5, 1]), image_tokens(width=32))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(variant="mu/8"), "model.decoder.variant"),
    (dict(max_len=4), "model.decoder.max_len"),
    (dict(num_heads=3), "model.decoder.num_heads"),
    (dict(dtype="float16"), "model.decoder.dtype"),
])
def test_config_errors(kwargs, field):
  with pytest.raises(ConfigError, match=field):
    TextDecoder(**{**TINY, **kwargs}).init(RNG, tokens_batch([3, 7, 5, 1]), image_tokens())


def test_causal_rows_do_not_see_later_tokens():
  model, params = tiny_params()
  toks = tokens_batch([3, 7, 5, 1])
  changed = toks.at[:, 4:].set(9)
  a = model.apply(params, toks, image_tokens())
  b = model.apply(params, changed, image_tokens())
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
  assert not np.allclose(a[:, 4:], b[:, 4:], atol=1e-3)
  # Truncating the sequence leaves the prefix's logits alone.
  short = model.apply(params, toks[:, :4], image_tokens())
  np.testing.assert_allclose(a[:, :4], short, atol=1e-6)


def test_parallel_rows_ignore_inputs_and_see_every_position():
  model, params = tiny_params()
  toks, img = tokens_batch([3, 7, 5, 1]), image_tokens()
  par = model.apply(params, toks, img, parallel=True)
  np.testing.assert_allclose(par, model.apply(params, jnp.full_like(toks, 5), img,
                                              parallel=True), atol=1e-6)
  # Under a causal mask position t could not tell whether later positions exist; without
  # one, dropping them changes what every earlier position attends to.
  short = model.apply(params, toks[:, :4], img, parallel=True)
  assert np.abs(par[:, :4] - short).max(axis=(1, 2)).min() > 1e-3
  mask = self_attention_mask(toks, PAD, jnp.array([True, False, True, False]))
  assert bool(jnp.all(mask[0])) and bool(jnp.all(mask[2]))
  assert not bool(mask[1, 0, 0, 1])  # causal row: position 0 does not see position 1


def test_mixed_batch_rows_match_their_modes():
  model, params = tiny_params()
  toks, img = tokens_batch([3, 7, 5, 1]), image_tokens()
  rows = jnp.array([True, False, False, True])
  mixed = model.apply(params, toks, img, parallel=rows)
  causal = model.apply(params, toks, img, parallel=None)
  par = model.apply(params, toks, img, parallel=jnp.ones(4, bool))
  np.testing.assert_allclose(mixed, jnp.where(rows[:, None, None], par, causal), atol=1e-6)
  np.testing.assert_allclose(causal, model.apply(params, toks, img, parallel=False))
  assert sample_parallel(RNG, 1000, 0.75).mean() == pytest.approx(0.75, abs=0.05)


def test_padding_inputs_are_masked_as_keys_but_bos_is_not():
  model, params = tiny_params()
  # Row 0 has a pad input at position 2 (3 real tokens after it), row 1 a real token there.
  toks = jnp.array([[BOS, 5, PAD, 6, 7, EOS, PAD, PAD], [BOS, 5, 8, 6, 7, EOS, PAD, PAD]])
  img = image_tokens(batch=2)
  flat = flatten_dict(params["params"])
  # Random, not constant: LayerNorm would cancel a shift of every channel by one amount.
  kick = jax.random.normal(jax.random.PRNGKey(5), (32,))
  flat[("pos_embedding",)] = flat[("pos_embedding",)].at[:, 2].add(kick)
  moved = {"params": unflatten_dict(flat)}
  a, b = model.apply(params, toks, img), model.apply(moved, toks, img)
  others = np.array([0, 1, 3, 4, 5])
  np.testing.assert_allclose(a[0, others], b[0, others], atol=1e-6)
  assert np.abs(a[1, 3:6] - b[1, 3:6]).max(axis=1).min() > 1e-3
  # BOS shares the pad id, yet every position attends it.
  assert bool(jnp.all(self_attention_mask(toks, PAD, None)[:, 0, :, 0]))


def test_remat_gives_same_logits_and_grads():
  model, params = tiny_params()
  remat = TextDecoder(**TINY, remat="full")
  toks, img = tokens_batch([3, 7, 5, 1]), image_tokens()

  def loss(m, p):
    return caption_loss(m.apply(p, toks, img), toks, PAD)[0]
  (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params)
                        for m in (model, remat))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, atol=1e-6)


# ---------------------------------------------------------------- losses


def np_logp(logits, targets):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def test_shift_right():
  toks = jnp.array([[5, 6, EOS, PAD], [7, EOS, PAD, PAD]])
  np.testing.assert_array_equal(shift_right(toks, 3), [[3, 5, 6, EOS], [3, 7, EOS, PAD]])


def test_caption_loss_and_logprob_match_numpy():
  targets = tokens_batch([3, 7, 5, 1], seed=3)[:, 1:]  # real lengths 2, 6, 4, 0 + padding
  logits = 3 * jax.random.normal(RNG, targets.shape + (VOCAB,))
  real = np.asarray(targets) != PAD
  ref = np_logp(logits, targets)
  loss, stats = caption_loss(logits, targets, PAD)
  np.testing.assert_allclose(loss, -ref[real].mean(), rtol=1e-5)
  assert stats["tokens"] == real.sum()
  hits = np.asarray(jnp.argmax(logits, -1) == targets)[real]
  np.testing.assert_allclose(stats["token_accuracy"], hits.mean(), rtol=1e-6)
  np.testing.assert_allclose(sequence_logprob(logits, targets, PAD),
                             np.where(real, ref, 0).sum(1), rtol=1e-5)
  empty, _ = caption_loss(logits, jnp.zeros_like(targets), PAD)
  assert float(empty) == 0.0


def test_padding_targets_change_neither_loss_nor_grad():
  targets = tokens_batch([3, 7, 5, 1], seed=3)[:, 1:]
  logits = jax.random.normal(RNG, targets.shape + (VOCAB,))
  pad = (targets == PAD)[..., None]
  noisy = jnp.where(pad, 50 * jax.random.normal(jax.random.PRNGKey(4), logits.shape), logits)
  broken = jnp.where(pad, jnp.inf, logits)

  def f(x):
    return caption_loss(x, targets, PAD)[0]
  base, grad = jax.value_and_grad(f)(logits)
  for other in (noisy, broken):
    value, g = jax.value_and_grad(f)(other)
    np.testing.assert_allclose(value, base, rtol=1e-6)
    np.testing.assert_allclose(g, grad, atol=1e-7)
  assert not np.any(np.asarray(grad)[np.asarray(pad[..., 0])])
  seq = jax.grad(lambda x: sequence_logprob(x, targets, PAD).sum())(broken)
  assert bool(jnp.all(jnp.isfinite(seq)))


# ---------------------------------------------------------------- decoding


def bigram_fn(table):
  """logits_fn whose logits at each position depend only on that position's input token
  (the previous output); context[i] picks row i's table."""
  table = jnp.log(jnp.asarray(table, jnp.float32))

  def logits_fn(tokens, context):
    return jax.vmap(lambda tab, toks: tab[toks])(table[context], tokens)
  return logits_fn


def chain_table(seq, vocab=10, after_eos=4):
  """Bigram probabilities [V, V] that favour `seq` (from BOS) by 0.6 to 0.04 per step."""
  tab = np.full((vocab, vocab), 0.4 / (vocab - 1))
  # EOS is followed by a likely token, which the decoder must turn into padding.
  nxt = list(seq) + ([after_eos] if seq[-1] == EOS else [])
  for prev, tok in zip([BOS] + list(seq), nxt):
    tab[prev] = 0.4 / (vocab - 1)
    tab[prev, tok] = 0.6
  return tab


def test_greedy_decode_follows_the_chain_stops_at_eos_and_pads():
  tables = np.stack([chain_table([5, 3, 7, EOS]), chain_table([2, 6, 2, 6, 2, 6, 2])])
  decode = jax.jit(functools.partial(greedy_decode, bigram_fn(tables), max_len=6,
                                     bos_id=BOS, eos_id=EOS, pad_id=PAD))
  out = decode(jnp.array([0, 1, 0]))
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, [[5, 3, 7, EOS, PAD, PAD], [2, 6, 2, 6, 2, 6],
                                      [5, 3, 7, EOS, PAD, PAD]])


def test_beam_search_finds_what_greedy_misses():
  v = 12
  tab = np.full((v, v), 1e-4)
  tab[BOS, 2], tab[BOS, 3] = 0.40, 0.35      # 2 looks better first ...
  tab[2, 4:12] = 0.12                        # ... but every continuation is unlikely
  tab[3, EOS] = 0.9                          # while 3 then EOS scores 0.315
  tab[4:12, EOS] = 0.9
  tab[EOS, 5] = 0.9
  tab /= tab.sum(1, keepdims=True)
  kw = dict(max_len=5, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  fn, ctx = bigram_fn(tab[None]), jnp.zeros(2, jnp.int32)
  greedy = greedy_decode(fn, ctx, **kw)
  np.testing.assert_array_equal(greedy[0, [0, 2]], [2, EOS])
  beam = jax.jit(functools.partial(beam_search, fn, beam_size=3, length_penalty=0.0, **kw))
  np.testing.assert_array_equal(beam(ctx), [[3, EOS, PAD, PAD, PAD]] * 2)


def test_beam_search_length_penalty_prefers_longer_captions():
  v = 8
  tab = np.full((v, v), 1e-4)
  tab[BOS, EOS], tab[BOS, 2] = 0.5, 0.45    # "" (p .5) vs "2 3 4" (p .45 * .9^3 = .33)
  tab[2, 3], tab[3, 4], tab[4, EOS] = 0.9, 0.9, 0.9
  tab[EOS, 5] = 0.9
  tab /= tab.sum(1, keepdims=True)
  fn, ctx = bigram_fn(tab[None]), jnp.zeros(1, jnp.int32)
  kw = dict(max_len=6, bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=2)
  np.testing.assert_array_equal(beam_search(fn, ctx, length_penalty=0.0, **kw)[0, :2],
                                [EOS, PAD])
  np.testing.assert_array_equal(beam_search(fn, ctx, length_penalty=1.0, **kw)[0, :5],
                                [2, 3, 4, EOS, PAD])


def test_beam_search_with_a_wide_beam_is_exhaustive_search():
  # Tokens EOS, 2, 3, 4 (pad is never generated); at most 3^3 = 27 live prefixes, so 27
  # beams hold every candidate and the result must be the exact best sequence.
  vocab, max_len, alpha = 5, 4, 0.6
  tables = np.random.default_rng(0).dirichlet(np.ones(vocab), size=(6, vocab))
  fn, ctx = bigram_fn(tables), jnp.arange(6)
  out = beam_search(fn, ctx, max_len=max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                    beam_size=27, length_penalty=alpha)
  for row, tab in enumerate(tables):
    logp = np.log(tab[:, 1:] / tab[:, 1:].sum(1, keepdims=True))  # renormalised without pad
    best, best_score = None, -np.inf
    for n in range(1, max_len + 1):
      for body in itertools.product(range(2, vocab), repeat=n - 1):
        for last in ([EOS] + list(range(2, vocab)) if n == max_len else [EOS]):
          seq = list(body) + [last]
          score = sum(logp[p, t - 1] for p, t in zip([BOS] + seq, seq)) / n ** alpha
          if score > best_score:
            best, best_score = seq, score
    np.testing.assert_array_equal(out[row], best + [PAD] * (max_len - len(best)))


# ---------------------------------------------------------------- learning


def toy_data(rng, n, captions):
  """8x8 images of one of len(captions) colours plus noise, and the class captions."""
  colours = np.array([[r, g, b] for r in (-1, 1) for g in (-1, 1) for b in (-1, 1)])
  labels = rng.integers(0, len(captions), n)
  images = colours[labels][:, None, None, :] * 0.7 + rng.normal(0, 0.3, (n, 8, 8, 3))
  return images.astype(np.float32), captions[labels]


def test_captioner_learns_toy_captions():
  rng = np.random.default_rng(0)
  max_len, steps, batch = 6, 200, 32
  captions = np.full((8, max_len), PAD, np.int32)  # one fixed caption of 2-5 tokens per class
  for c in range(8):
    n = rng.integers(2, 6)
    captions[c, :n], captions[c, n] = rng.integers(2, VOCAB, n), EOS
  vit = ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4)
  dec = TextDecoder(vocab_size=VOCAB, max_len=max_len, width=32, depth=1, mlp_dim=64,
                    num_heads=2)
  images, targets = toy_data(rng, steps * batch, captions)
  k1, k2 = jax.random.split(RNG)
  img_tok = lambda p, x: vit.apply(p, x)[1]["tokens"]
  params = {"img": vit.init(k1, images[:2])}
  params["dec"] = dec.init(k2, targets[:2], img_tok(params["img"], images[:2]))
  tx = optax.adam(3e-3)

  def loss_fn(p, x, y, rng):
    # Half the rows by CapPa's parallel prediction, so that path trains too.
    logits = dec.apply(p["dec"], shift_right(y, BOS), img_tok(p["img"], x),
                       parallel=sample_parallel(rng, y.shape[0], 0.5))
    return caption_loss(logits, y, PAD)[0]

  @jax.jit
  def train(params, images, targets):
    def step(carry, xs):
      params, opt = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, *xs)
      updates, opt = tx.update(grads, opt)
      return (optax.apply_updates(params, updates), opt), loss
    xs = (images.reshape(steps, batch, 8, 8, 3), targets.reshape(steps, batch, max_len),
          jax.random.split(RNG, steps))
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), xs)
    return params, losses

  params, losses = train(params, images, targets)
  test_x, test_y = toy_data(np.random.default_rng(1), 64, captions)

  @jax.jit
  def evaluate(p, x, y):
    tokens = img_tok(p["img"], x)
    fn = lambda toks, img: dec.apply(p["dec"], toks, img)
    out = greedy_decode(fn, tokens, max_len=max_len, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    inputs = shift_right(y, BOS)
    loss = caption_loss(fn(inputs, tokens), y, PAD)[0]
    par = dec.apply(p["dec"], inputs, tokens, parallel=True)  # one pass, no inputs seen
    return out, loss, caption_loss(par, y, PAD)[0]

  out, test_loss, parallel_loss = evaluate(params, test_x, test_y)
  assert float(losses[:10].mean()) > 1.5  # starts near log(16) = 2.77
  assert float(test_loss) < 0.1 and float(parallel_loss) < 0.1
  exact = np.mean(np.all(np.asarray(out) == test_y, axis=1))
  assert exact > 0.9, exact  # chance: one caption for every image, about 1/8
