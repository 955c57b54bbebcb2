"""FILIP similarity and loss against NumPy loops; sharded equals global; evaluator scoring."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_vlp import losses_filip
from big_vlp.config_errors import ConfigError
from big_vlp.evaluators import common, retrieval, zeroshot
from big_vlp.sharding import BATCH_AXES, make_mesh


def np_filip(x, y, mask):
  """s_i2t, s_t2i by explicit loops over pairs, patches and real words."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  s_i2t = np.zeros((len(x), len(y)))
  s_t2i = np.zeros((len(x), len(y)))
  for i in range(len(x)):
    for j in range(len(y)):
      words = [y[j, t] for t in range(y.shape[1]) if mask[j, t]]
      if not words:
        continue  # a text of padding only scores 0
      s_i2t[i, j] = np.mean([max(float(p @ w) for w in words) for p in x[i]])
      s_t2i[i, j] = np.mean([max(float(p @ w) for p in x[i]) for w in words])
  return s_i2t, s_t2i


def np_filip_loss(name, x, y, mask, s, b):
  """The FILIP losses of the definition, and mean diagonal / off-diagonal logits."""
  s_i2t, s_t2i = np_filip(x, y, mask)
  b = 0.0 if name == "softmax" or b is None else b
  li2t, lt2i = s * s_i2t + b, s * s_t2i + b
  n = len(x)
  if name == "softmax":
    rows = [math.log(np.exp(li2t[i]).sum()) - li2t[i, i] for i in range(n)]
    cols = [math.log(np.exp(lt2i[:, j]).sum()) - lt2i[j, j] for j in range(n)]
    loss = 0.5 * (np.mean(rows) + np.mean(cols))
  else:
    z = 2.0 * np.eye(n) - 1.0
    siglip = lambda l: np.sum(np.logaddexp(0.0, -z * l)) / n
    loss = 0.5 * (siglip(li2t) + siglip(lt2i))
  sym = 0.5 * (li2t + lt2i)
  pos = np.trace(sym)
  return loss, {"pos_logit": pos / n, "neg_logit": (sym.sum() - pos) / (n * (n - 1))}


def _normed(rng, *shape):
  v = rng.normal(size=shape)
  return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _tokens(seed, batch, patches=3, length=5, d=4, empty_text=True):
  """Random unit tokens; texts with 0..L real tokens (prefix masks), one of padding only."""
  rng = np.random.default_rng(seed)
  x, y = _normed(rng, batch, patches, d), _normed(rng, batch, length, d)
  lengths = rng.integers(1, length + 1, size=batch)
  lengths[0] = length
  if empty_text:
    lengths[batch // 2] = 0
  mask = np.arange(length)[None, :] < lengths[:, None]
  return x, y, mask


def test_similarities_match_numpy_loops():
  x, y, mask = _tokens(0, 6)
  x = x[:4]  # Bi != Bt is allowed here
  got = losses_filip.filip_similarities(x, y, mask)
  want = np_filip(x, y, mask)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32 and g.shape == (4, 6)
    np.testing.assert_allclose(g, w, atol=1e-6)
  assert np.all(np.asarray(got[0])[:, 3] == 0) and np.all(np.asarray(got[1])[:, 3] == 0)


def test_padding_is_invisible():
  """More padding tokens with random (non-zero) embeddings change nothing, gradients included."""
  x, y, mask = _tokens(1, 5)
  extra = _normed(np.random.default_rng(2), 5, 3, 4)
  y2 = np.concatenate([y, extra], axis=1)
  mask2 = np.concatenate([mask, np.zeros((5, 3), bool)], axis=1)
  for a, b in zip(losses_filip.filip_similarities(x, y, mask),
                  losses_filip.filip_similarities(x, y2, mask2)):
    np.testing.assert_array_equal(a, b)
  # Padding tokens get no gradient, and the all-padding text gets zero, not NaN.
  g = jax.grad(lambda y: losses_filip.filip_loss("sigmoid", x, y, mask2, 3.0, -1.0)[0])(y2)
  assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(np.asarray(g)[~mask2], 0.0)


@pytest.mark.parametrize("name,s,b", [("softmax", 7.0, None), ("sigmoid", 10.0, -10.0),
                                      ("sigmoid", 2.5, 0.7), ("sigmoid", 4.0, None)])
def test_loss_matches_numpy(name, s, b):
  x, y, mask = _tokens(3, 6)
  loss, stats = losses_filip.filip_loss(name, x, y, mask, s, b)
  want, want_stats = np_filip_loss(name, x, y, mask, s, b)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for k in ("pos_logit", "neg_logit"):
    np.testing.assert_allclose(stats[k], want_stats[k], rtol=1e-5, atol=1e-6)


def test_unknown_name_and_bad_shapes():
  x, y, mask = _tokens(4, 4)
  with pytest.raises(ConfigError, match=r"config\.loss='hinge'.*'softmax', 'sigmoid'"):
    losses_filip.filip_loss("hinge", x, y, mask, 1.0, None)
  with pytest.raises(ValueError, match="disagree"):
    losses_filip.filip_loss("softmax", x[:3], y, mask, 1.0, None)


def _mesh(shape):
  data, fsdp, tensor = shape
  return make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor},
                   jax.devices()[:data * fsdp * tensor])


# (data, fsdp, tensor): the ring over one axis, over two axes, a single device, and a mesh
# whose 'tensor' axis is not a batch axis (the batch is replicated along it).
MESHES = [(8, 1, 1), (2, 4, 1), (1, 1, 1), (2, 2, 2)]


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_matches_global_values_stats_and_gradients(shape):
  mesh = _mesh(shape)
  x, y, mask = _tokens(5 + shape[0], 16)
  sh = NamedSharding(mesh, P(BATCH_AXES))
  xs, ys, ms = (jax.device_put(a, sh) for a in (x, y, mask))
  s, b = jnp.float32(4.2), jnp.float32(-3.1)
  argn = (0, 1, 2, 3)
  for name in ("softmax", "sigmoid"):
    glob = jax.jit(jax.value_and_grad(
        lambda x, y, s, b: losses_filip.filip_loss(name, x, y, mask, s, b),
        argnums=argn, has_aux=True))
    shard = jax.jit(jax.value_and_grad(
        lambda x, y, m, s, b: losses_filip.filip_loss_sharded(name, x, y, m, s, b, mesh),
        argnums=(0, 1, 3, 4), has_aux=True))
    (want, want_stats), want_g = glob(x, y, s, b)
    (got, got_stats), got_g = shard(xs, ys, ms, s, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
    for k in want_stats:
      np.testing.assert_allclose(got_stats[k], want_stats[k], rtol=1e-5, atol=1e-6)
    for g, w in zip(got_g, want_g):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
  # The value of the definition too (one mesh is enough for the NumPy loops).
  if shape == MESHES[1]:
    got, _ = losses_filip.filip_loss_sharded("sigmoid", xs, ys, ms, 10.0, -10.0, mesh)
    np.testing.assert_allclose(got, np_filip_loss("sigmoid", x, y, mask, 10.0, -10.0)[0],
                               rtol=1e-5)


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_sharded_holds_at_most_one_block(name):
  """Nothing in the shard_map body, forward or backward, is larger than one b x b x N x L
  block: not the global [B, B] logits, nor text blocks stacked per hop."""
  mesh = _mesh((8, 1, 1))
  batch, patches, length, d = 16, 3, 5, 4
  b = batch // 8
  x, y, mask = _tokens(6, batch, patches, length, d)
  block = b * b * patches * length
  assert batch * batch > block and batch * length * d > block  # what must not appear
  loss = lambda x, y: losses_filip.filip_loss_sharded(name, x, y, mask, 3.0, -1.0, mesh)[0]
  for fn in (loss, jax.grad(loss, argnums=(0, 1))):
    closed = jax.make_jaxpr(fn)(x, y)
    bodies = [e.params["jaxpr"] for e in _eqns(closed.jaxpr)
              if e.primitive.name == "shard_map"]
    assert bodies
    sizes = [math.prod(v.aval.shape) for body in bodies for e in _eqns(body)
             for v in e.outvars if hasattr(v.aval, "shape")]
    assert max(sizes) == block, max(sizes)
    names = {e.primitive.name for body in bodies for e in _eqns(body)}
    assert "ppermute" in names and "all_gather" not in names


def test_sharded_batch_must_divide():
  mesh = _mesh((8, 1, 1))
  x, y, mask = _tokens(7, 12)
  with pytest.raises(ValueError, match=r"batch size 12 .*device count 8"):
    losses_filip.filip_loss_sharded("softmax", x, y, mask, 1.0, None, mesh)


def test_chunked_scores_match_similarities():
  """Chunks in both directions, with padded last chunks, give the one-call values."""
  x, y, mask = _tokens(8, 11, patches=4, length=6, d=8)
  x = np.concatenate([x, x[:2]])  # 13 images, 11 texts
  want = losses_filip.filip_similarities(x, y, mask)
  # budget: 5 images x 3 texts x 4 x 6 per call
  got = common.filip_scores(x, y, mask, img_chunk=5, budget=5 * 3 * 4 * 6)
  for g, w in zip(got, want):
    assert g.shape == (13, 11)
    np.testing.assert_allclose(g, w, atol=1e-6)
  got = common.filip_scores(x, y, mask)  # one chunk
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-6)


def test_recall_at_k_ranks_each_direction_by_its_matrix():
  sim = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  t2i = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.5]])
  out = retrieval.recall_at_k(sim, (1, 2), sim_t2i=t2i)
  assert out["i2t_r1"] == 1.0
  # Column ranks of t2i's diagonal: text 0 -> 1 above, text 1 -> 0 above, text 2 -> 1 above.
  assert out["t2i_r1"] == pytest.approx(1 / 3) and out["t2i_r2"] == 1.0
  assert retrieval.recall_at_k(sim, (1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}


class _FakeEncoders:
  """Token encoders that look the embeddings up by index (image = its id, text = its id)."""

  def __init__(self, img_tok, txt_tok, txt_mask):
    self.img_tok, self.txt_tok, self.txt_mask = img_tok, txt_tok, txt_mask

  def image_tokens(self, params, ids):
    return self.img_tok[ids]

  def text_tokens(self, params, ids):
    return self.txt_tok[ids[:, 0]], self.txt_mask[ids[:, 0]]


def test_filip_evaluators_score_with_token_similarities():
  x, y, mask = _tokens(9, 10, empty_text=False)
  s_i2t, s_t2i = (np.asarray(a) for a in losses_filip.filip_similarities(x, y, mask))
  batches = [{"image": np.arange(0, 6), "text": np.arange(0, 6)[:, None],
              "label": np.arange(0, 6) % 2},
             {"image": np.arange(6, 10), "text": np.arange(6, 10)[:, None],
              "label": np.arange(6, 10) % 2}]
  data = types.SimpleNamespace(eval_iterator=lambda **kw: iter([dict(b) for b in batches]))
  cfg = {"data": "fake", "split": "test", "pp": "", "batch_size": 6,
         "class_names": ["a", "b"], "templates": ["{} 0", "{} 1"]}
  cfg = types.SimpleNamespace(**cfg, get=cfg.get)
  enc = _FakeEncoders(x, y, mask)

  ret = retrieval.Retrieval("ret", cfg, encoders=enc, tokenizer=None, text_len=5, data=data,
                            similarity="filip")
  assert ret.run(None) == retrieval.recall_at_k(s_i2t, sim_t2i=s_t2i)

  # Prompt "<class> <template>" is text 2 * class + template.
  tokenizer = types.SimpleNamespace(encode=lambda prompts, n: np.array(
      [[2 * "ab".index(p[0]) + int(p[-1])] for p in prompts]))
  zs = zeroshot.ZeroShot("zs", cfg, encoders=enc, tokenizer=tokenizer, text_len=5,
                         data=data, similarity="filip")
  scores = (0.5 * (s_i2t + s_t2i))[:, :4].reshape(10, 2, 2).mean(axis=2)
  assert zs.run(None) == zeroshot.topk_metrics(scores, np.arange(10) % 2, 2)


def test_similarity_choice():
  assert common.similarity_of({}) == "pooled"
  assert common.similarity_of({"similarity": "filip"}) == "filip"
  with pytest.raises(ConfigError, match=r"config\.similarity='late'.*'pooled', 'filip'"):
    common.similarity_of({"similarity": "late"})
