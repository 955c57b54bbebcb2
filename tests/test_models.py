"""Behaviour tests for the model package: sizes, ViT, text tower, two towers."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from big_vlp.config_errors import ConfigError
from big_vlp.models import SIZES, TextTransformer, TwoTower, ViT, decode_variant
from big_vlp.models.common import (REMAT_POLICIES, posemb_sincos_2d, resolve_remat,
                                   stack_layers, unstack_layers)

# Copied by hand from REFERENCE.md section 5 (plus the tiny 'mu' test size).
TABLE = {
    "mu": (32, 1, 128, 2), "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8), "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16), "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16),
}
VOCAB, EOS, PAD = 40, 39, 0
# Every text test uses [4, 12] or [4, 16] token batches and every square-image test uses
# IMAGE_SHAPE: eager op executables are cached per shape, which keeps the suite fast.
LENGTHS = [5, 12, 9, 1]
IMAGE_SHAPE = (4, 16, 24, 3)  # a 2 x 3 grid of 8-pixel patches
RNG = jax.random.PRNGKey(0)


def paths(params) -> dict:
  return flatten_dict(params["params"], sep="/")


def init_apply(model, *args, **kwargs):
  """Initialises `model` on args and applies it."""
  # Eager on purpose: op-by-op executables are cached across tests, while jitting each tiny
  # model would compile a whole new program per test (seconds each on a shared 2-core box).
  params = model.init(RNG, *args)
  return params, model.apply(params, *args, **kwargs)


def text_batch(lengths, total_len, seed=0):
  """Token rows of the given real lengths (EOS last), right-padded with PAD to total_len."""
  rng = np.random.default_rng(seed)
  toks = np.full((len(lengths), total_len), PAD, np.int32)
  for i, n in enumerate(lengths):
    toks[i, :n - 1] = rng.integers(1, EOS, n - 1)
    toks[i, n - 1] = EOS
  return jnp.asarray(toks)


# ---------------------------------------------------------------- sizes and variants


@pytest.mark.parametrize("name", list(TABLE))
def test_decode_variant_matches_table(name):
  width, depth, mlp, heads = TABLE[name]
  size = dict(width=width, depth=depth, mlp_dim=mlp, num_heads=heads)
  assert decode_variant(name) == size
  assert decode_variant(f"{name}/14") == dict(size, patch_size=(14, 14))
  assert SIZES[name] == size


def test_decode_variant_none_and_table_complete():
  assert decode_variant(None) == {}
  assert set(SIZES) == set(TABLE)


@pytest.mark.parametrize("bad", ["Z/16", "b/16", "B/", "B/x", "B/16/2", "B/0", "", "/16", 16])
def test_decode_variant_errors_name_field_and_sizes(bad):
  with pytest.raises(ConfigError) as err:
    decode_variant(bad, field="model.text.variant")
  msg = str(err.value)
  assert "model.text.variant" in msg
  assert "SIZE/PATCH" in msg
  for name in TABLE:
    assert f" {name}" in msg


def test_decode_variant_default_field():
  with pytest.raises(ConfigError, match="model.image.variant"):
    decode_variant("XL/16")


# ---------------------------------------------------------------- ViT


@pytest.mark.parametrize("pool_type", ["gap", "map", "tok"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_vit_shapes(pool_type, posemb):
  model = ViT(variant="mu/8", pool_type=pool_type, posemb=posemb)
  params, (pooled, aux) = init_apply(model, jnp.ones(IMAGE_SHAPE))
  assert pooled.shape == (4, 32)
  assert aux["tokens"].shape == (4, 2 * 3, 32)  # (16/8) x (24/8) patches
  names = paths(params)
  assert names["embedding/kernel"].shape == (8, 8, 3, 32)
  assert ("pos_embedding" in names) == (posemb == "learn")
  if posemb == "learn":
    assert names["pos_embedding"].shape == (1, 6, 32)
  assert ("cls" in names) == (pool_type == "tok")
  assert any(k.startswith("MAPHead_0/") for k in names) == (pool_type == "map")
  assert bool(jnp.all(jnp.isfinite(pooled)))


def test_vit_overrides_beat_variant():
  # Every Ti/16 value overridden down to mu/8 sizes (so the cached mu executables apply).
  model = ViT(variant="Ti/16", width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=8)
  params, (pooled, aux) = init_apply(model, jnp.ones(IMAGE_SHAPE))
  names = paths(params)
  assert pooled.shape == (4, 32) and aux["tokens"].shape == (4, 6, 32)
  assert names["embedding/kernel"].shape == (8, 8, 3, 32)
  assert "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel" in names
  assert "Transformer/encoderblock_2/LayerNorm_0/scale" not in names
  assert names["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape == (32, 128)
  qkv = names["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
  assert qkv.shape == (32, 2, 16)


@pytest.mark.parametrize("kwargs, field", [
    (dict(width=32, depth=1, mlp_dim=64, patch_size=8), "model.image.num_heads"),
    (dict(variant="mu"), "model.image.patch_size"),
    (dict(variant="mu/8", pool_type="cls"), "model.image.pool_type"),
    (dict(variant="mu/8", posemb="sincos"), "model.image.posemb"),
    (dict(variant="mu/8", dtype="float16"), "model.image.dtype"),
    (dict(variant="mu/8", num_heads=3), "model.image.num_heads"),
    (dict(variant="mu/5"), "model.image.patch_size"),
    (dict(variant="mu/8", width=30, posemb="sincos2d"), "model.image.width"),
])
def test_vit_config_errors(kwargs, field):
  with pytest.raises(ConfigError, match=field):
    ViT(**kwargs).init(RNG, jnp.ones(IMAGE_SHAPE))


def test_vit_bad_choice_lists_allowed_values():
  with pytest.raises(ConfigError) as err:
    ViT(variant="mu/8", pool_type="cls").init(RNG, jnp.ones(IMAGE_SHAPE))
  assert all(p in str(err.value) for p in ("'gap'", "'map'", "'tok'"))


def test_sincos2d_matches_numpy_formula():
  h, w, width, temp = 3, 5, 16, 10_000.0
  got = np.asarray(posemb_sincos_2d(h, w, width, temperature=temp))
  assert got.shape == (1, h * w, width)
  q = width // 4
  want = np.zeros((h * w, width))
  for row in range(h):
    for col in range(w):
      for k in range(q):
        freq = temp ** (-k / (q - 1))
        want[row * w + col, k] = math.sin(col * freq)
        want[row * w + col, q + k] = math.cos(col * freq)
        want[row * w + col, 2 * q + k] = math.sin(row * freq)
        want[row * w + col, 3 * q + k] = math.cos(row * freq)
  np.testing.assert_allclose(got[0], want, atol=1e-6)


def test_sincos2d_is_used_by_vit():
  # With a zero patch embedding the tokens fed to the encoder are the posemb itself, so
  # tokens differ across positions only through it; check posemb reaches the encoder.
  model = ViT(variant="mu/8", posemb="sincos2d")
  image = jnp.zeros(IMAGE_SHAPE)
  params = model.init(RNG, image)
  _, aux = model.apply(params, image)
  assert float(jnp.abs(aux["tokens"][0, 0] - aux["tokens"][0, 4]).max()) > 1e-3


def vit_param_count(width, depth, mlp, patch, image, channels=3) -> int:
  """Analytic parameter count of a 'gap' ViT without head."""
  n = (image // patch) ** 2
  embed = patch * patch * channels * width + width
  attn = 4 * (width * width + width)
  mlp_block = width * mlp + mlp + mlp * width + width
  block = 2 * (2 * width) + attn + mlp_block
  return embed + n * width + depth * block + 2 * width


def test_vit_b16_param_count_without_init():
  model = ViT(variant="B/16")
  shapes = jax.eval_shape(model.init, RNG, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert count == vit_param_count(768, 12, 3072, 16, 224)
  assert 85e6 < count < 87e6


# ---------------------------------------------------------------- text tower


def text_model(**kw):
  kw = dict(dict(vocab_size=VOCAB, max_len=16, variant="mu", depth=2), **kw)
  return TextTransformer(**kw)


@pytest.mark.parametrize("pool_type", ["last", "first", "gap", "map"])
def test_text_shapes(pool_type):
  model = text_model(pool_type=pool_type)
  tokens = text_batch(LENGTHS, 12)
  params, (pooled, aux) = init_apply(model, tokens)
  assert pooled.shape == (4, 32)
  assert aux["tokens"].shape == (4, 12, 32)
  names = paths(params)
  assert names["Embed_0/embedding"].shape == (VOCAB, 32)
  assert names["pos_embedding"].shape == (1, 16, 32)
  assert any(k.startswith("MAPHead_0/") for k in names) == (pool_type == "map")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pool_type", ["last", "first", "gap", "map"])
def test_text_padding_invariance(pool_type, causal):
  model = text_model(pool_type=pool_type, causal=causal)
  short, long = text_batch(LENGTHS, 12), text_batch(LENGTHS, 16)
  params = model.init(RNG, long)
  out_short, _ = model.apply(params, short)
  out_long, _ = model.apply(params, long)
  np.testing.assert_allclose(out_short, out_long, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_causal_mask(causal):
  model = text_model(causal=causal)
  tokens = text_batch(LENGTHS, 12)  # row 1 has no padding
  changed = tokens.at[1, 8].set(tokens[1, 8] % (EOS - 1) + 1)  # differs, still not PAD
  assert int(changed[1, 8]) != int(tokens[1, 8])
  params = model.init(RNG, tokens)
  _, aux_a = model.apply(params, tokens)
  _, aux_b = model.apply(params, changed)
  diff = jnp.abs(aux_a["tokens"] - aux_b["tokens"]).max(axis=-1)[1]
  if causal:
    assert float(diff[:8].max()) < 1e-6
  else:
    assert float(diff[:8].min()) > 1e-4
  assert float(diff[8:].min()) > 1e-4


def test_last_pooling_picks_eos():
  model = text_model(pool_type="last")
  tokens = text_batch(LENGTHS, 12)
  params = model.init(RNG, tokens)
  pooled, aux = model.apply(params, tokens)
  for row, length in enumerate(LENGTHS):
    np.testing.assert_allclose(pooled[row], aux["tokens"][row, length - 1], atol=1e-6)
  # A token before EOS matters; the amount of padding after it does not.
  before = tokens.at[0, 3].set(tokens[0, 3] % (EOS - 1) + 1)
  assert float(jnp.abs(model.apply(params, before)[0][0] - pooled[0]).max()) > 1e-4
  more_pad = text_batch(LENGTHS, 16)
  np.testing.assert_allclose(model.apply(params, more_pad)[0], pooled, atol=1e-5)


@pytest.mark.parametrize("pool_type", ["last", "first", "gap", "map"])
def test_all_padding_row_is_finite(pool_type):
  model = text_model(pool_type=pool_type, causal=True)
  tokens = jnp.zeros((4, 12), jnp.int32)
  _, (pooled, aux) = init_apply(model, tokens)
  assert bool(jnp.all(jnp.isfinite(pooled))) and bool(jnp.all(jnp.isfinite(aux["tokens"])))


@pytest.mark.parametrize("kwargs, field", [
    (dict(pool_type="cls"), "model.text.pool_type"),
    (dict(variant="mu/16"), "model.text.variant"),
    (dict(max_len=10), "model.text.max_len"),
    (dict(dropout=1.5), "model.text.dropout"),
])
def test_text_config_errors(kwargs, field):
  with pytest.raises(ConfigError, match=field):
    text_model(**kwargs).init(RNG, text_batch(LENGTHS, 12))


# ---------------------------------------------------------------- remat, scan, dropout


def test_remat_same_params_and_outputs():
  # Legacy bool configs: remat=True is the "full" policy.
  assert resolve_remat(True, "model.image.remat") == "full"
  assert resolve_remat(False, "model.image.remat") == "none"
  image = jnp.ones(IMAGE_SHAPE)
  plain, remat = ViT(variant="mu/8", depth=2), ViT(variant="mu/8", depth=2, remat=True)
  params = plain.init(RNG, image)
  assert jax.tree.structure(params) == jax.tree.structure(remat.init(RNG, image))
  np.testing.assert_allclose(plain.apply(params, image)[0], remat.apply(params, image)[0],
                             atol=1e-6)


SMALL_IMAGE = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))


def tower(kind: str, **kw):
  """(model, input) for a depth-2 mu tower; the text one is causal with padded rows."""
  if kind == "vit":
    return ViT(variant="mu/8", depth=2, **kw), SMALL_IMAGE
  return text_model(causal=True, **kw), text_batch(LENGTHS, 12)


def value_and_grads(model, params, x):
  """Pooled output and d(sum of squares of the output) / d(params)."""
  def loss(p):
    out = model.apply(p, x)[0]
    return jnp.sum(out * out), out
  # Jitted: eager backward ops of these new shapes would each compile on first use, which
  # costs more than one whole-program compile per policy.
  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, grads


@functools.cache
def no_remat_reference(kind: str):
  """(params, output, grads) of the tower without remat, shared by the policy tests."""
  plain, x = tower(kind)
  params = plain.init(RNG, x)
  return (params, *value_and_grads(plain, params, x))


@pytest.mark.parametrize("policy", REMAT_POLICIES[1:])
@pytest.mark.parametrize("kind", ["vit", "text"])
def test_remat_policies_same_outputs_and_grads(kind, policy):
  params, want_out, want_grads = no_remat_reference(kind)
  model, x = tower(kind, remat=policy)
  out, grads = value_and_grads(model, params, x)
  np.testing.assert_allclose(out, want_out, atol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5), grads, want_grads)


@pytest.mark.parametrize("kind, field", [("vit", "model.image"), ("text", "model.text")])
def test_bad_remat_and_scan_name_field(kind, field):
  model, x = tower(kind, remat="dot")
  with pytest.raises(ConfigError) as err:
    model.init(RNG, x)
  msg = str(err.value)
  assert f"{field}.remat='dot'" in msg
  assert all(repr(p) in msg for p in REMAT_POLICIES)
  model, x = tower(kind, scan="yes")
  with pytest.raises(ConfigError, match=f"{field}.scan"):
    model.init(RNG, x)


@pytest.mark.parametrize("kind, remat", [("vit", "none"), ("text", "none"), ("vit", "full"),
                                         ("text", "dots_no_batch")])
def test_scan_matches_stacked_unscanned(kind, remat):
  plain, x = tower(kind)
  scanned = tower(kind, scan=True, remat=remat)[0]
  params = plain.init(RNG, x)
  scanned_params = jax.eval_shape(scanned.init, RNG, x)  # Shapes only: saves a compile.
  names = paths(scanned_params)
  assert not any("encoderblock_" in k for k in names)
  assert names["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 32, 128)
  stacked = stack_layers(params)
  assert jax.tree.structure(stacked) == jax.tree.structure(scanned_params)
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scanned_params)
  np.testing.assert_allclose(scanned.apply(stacked, x)[0], plain.apply(params, x)[0],
                             atol=1e-5)
  back = unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_stack_layers_rejects_gaps_and_mixed_layouts():
  leaf = jnp.zeros(2)
  with pytest.raises(ValueError, match="encoderblock_0"):
    stack_layers({"encoderblock_0": leaf, "encoderblock_2": leaf})
  with pytest.raises(ValueError, match="mixed"):
    unstack_layers({"encoderblock": jnp.zeros((2, 2)), "encoderblock_0": leaf})
  # Other keys pass through untouched; trees without blocks are unchanged.
  tree = {"a": {"encoderblock_0": {"w": leaf}, "encoderblock_1": {"w": leaf + 1}, "n": leaf}}
  stacked = stack_layers(tree)
  assert stacked["a"]["encoderblock"]["w"].shape == (2, 2)
  assert stacked["a"]["n"] is leaf
  assert stack_layers({"x": leaf}) == {"x": leaf}


def test_scan_dropout_trains():
  plain, x = tower("text", dropout=0.5)
  params = plain.init(RNG, x)
  scanned = tower("text", scan=True, dropout=0.5)[0]
  train = scanned.apply(stack_layers(params), x, train=True, rngs={"dropout": RNG})[0]
  assert bool(jnp.all(jnp.isfinite(train)))
  assert float(jnp.abs(train - plain.apply(params, x)[0]).max()) > 1e-4


def compiled_grad(model, image):
  """The compiled d(sum(output)) / d(params)."""
  params = jax.eval_shape(model.init, RNG, image)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x)[0])))
  return grad.lower(params, image).compile()


@pytest.mark.parametrize("scan", [False, True])
def test_remat_lowers_compiled_memory(scan):
  image = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
  size = dict(width=64, depth=4, mlp_dim=256, num_heads=2, patch_size=4, scan=scan)
  none, full = (compiled_grad(ViT(**size, remat=r), image) for r in ("none", "full"))
  none_bytes, full_bytes = (c.memory_analysis().temp_size_in_bytes for c in (none, full))
  if scan:
    # Scanned, each layer's saved activations are a stacked buffer, so dropping them shows
    # fully.
    assert full_bytes < none_bytes / 2
  else:
    # Unscanned, the forward pass is recomputed (more matmuls in the compiled program), but
    # XLA:CPU's buffer assignment keeps the same scratch memory either way (equal at four
    # model sizes; 2-4% less with remat before models/layernorm.py): it recomputes ahead of
    # need and saves nothing.
    dots = lambda c: len(re.findall(r"ynn_fusion|\bdot\(", c.as_text()))
    assert dots(full) > dots(none)
    assert full_bytes <= none_bytes


def test_dropout_only_in_train():
  model = text_model(dropout=0.5)
  tokens = text_batch(LENGTHS, 12)
  params = model.init(RNG, tokens)
  eval_a = model.apply(params, tokens)[0]
  np.testing.assert_allclose(eval_a, model.apply(params, tokens)[0])
  train = model.apply(params, tokens, train=True, rngs={"dropout": RNG})[0]
  assert float(jnp.abs(train - eval_a).max()) > 1e-4


# ---------------------------------------------------------------- two towers


IMAGE = dict(variant="mu/8", pool_type="map")
TEXT = dict(vocab_size=VOCAB, max_len=16, variant="mu")


def two_tower_inputs():
  image = np.random.default_rng(0).normal(size=IMAGE_SHAPE)
  return jnp.asarray(image, jnp.float32), text_batch(LENGTHS, 12)


@pytest.mark.parametrize("embed_dim", [None, 24])
def test_two_tower_outputs(embed_dim):
  model = TwoTower(image=IMAGE, text=TEXT, embed_dim=embed_dim)
  image, tokens = two_tower_inputs()
  params, (zimg, ztxt, out) = init_apply(model, image, tokens)
  dim = embed_dim or 32
  assert zimg.shape == (4, dim) and ztxt.shape == (4, dim)
  assert zimg.dtype == jnp.float32 and ztxt.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(model.apply(params, image, method=TwoTower.encode_image), zimg,
                             atol=1e-6)
  np.testing.assert_allclose(model.apply(params, tokens, method=TwoTower.encode_text), ztxt,
                             atol=1e-6)
  names = paths(params)
  assert names["t"].shape == () and names["t"].dtype == jnp.float32
  assert names["b"].shape == () and names["b"].dtype == jnp.float32
  np.testing.assert_allclose(names["t"], math.log(10), rtol=1e-6)
  np.testing.assert_allclose(names["b"], -10.0)
  np.testing.assert_allclose(out["t"], math.log(10), rtol=1e-6)
  np.testing.assert_allclose(out["scale"], 10.0, rtol=1e-5)
  np.testing.assert_allclose(out["bias"], -10.0)
  assert all(out[k].dtype == jnp.float32 for k in ("t", "scale", "bias"))
  assert ("img/head/kernel" in names) == ("txt/head/kernel" in names) == (embed_dim is not None)
  assert "img/embedding/kernel" in names and "txt/Embed_0/embedding" in names
  assert "img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel" in names


def test_two_tower_no_bias_and_clamp():
  image, tokens = two_tower_inputs()
  model = TwoTower(image=IMAGE, text=TEXT, bias_init=None,
                   temperature_init=math.log(200.0), max_scale=100.0)
  params, (_, _, out) = init_apply(model, image, tokens)
  assert "b" not in params["params"] and out["bias"] is None
  np.testing.assert_allclose(out["t"], math.log(200.0), rtol=1e-6)
  np.testing.assert_allclose(out["scale"], 100.0, rtol=1e-5)
  # Below the clamp the scale is exp(t) unchanged.
  low = TwoTower(image=IMAGE, text=TEXT, temperature_init=math.log(1 / 0.07), max_scale=100.0)
  _, (_, _, out) = init_apply(low, image, tokens)
  np.testing.assert_allclose(out["scale"], 1 / 0.07, rtol=1e-5)


def test_bfloat16_towers_float32_params_and_embeddings():
  image, tokens = two_tower_inputs()
  model = TwoTower(image=dict(IMAGE, dtype="bfloat16"),
                   text=dict(TEXT, dtype="bfloat16", causal=True, pool_type="gap"), embed_dim=16)
  params, (zimg, ztxt, out) = init_apply(model, image, tokens)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert zimg.dtype == jnp.float32 and ztxt.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(zimg))) and bool(jnp.all(jnp.isfinite(ztxt)))
  assert all(out[k].dtype == jnp.float32 for k in ("t", "scale", "bias"))
  # The towers themselves compute in bfloat16.
  pooled, aux = model.apply(params, image, method=lambda m, x: m.img(x))
  assert pooled.dtype == jnp.bfloat16 and aux["tokens"].dtype == jnp.bfloat16
  pooled, aux = model.apply(params, tokens, method=lambda m, x: m.txt(x))
  assert pooled.dtype == jnp.bfloat16 and aux["tokens"].dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(aux["tokens"].astype(jnp.float32))))


@pytest.mark.parametrize("kwargs, field", [
    (dict(image=dict(IMAGE, width=64, num_heads=2), text=TEXT), "model.embed_dim"),
    (dict(image=dict(IMAGE, patch=8), text=TEXT), "model.image.patch"),
    (dict(image=IMAGE, text=dict(TEXT, head_dim=8), embed_dim=16), "model.text.head_dim"),
    (dict(image=IMAGE, text=TEXT, max_scale=0.0), "model.max_scale"),
])
def test_two_tower_config_errors(kwargs, field):
  image, tokens = two_tower_inputs()
  with pytest.raises(ConfigError, match=field):
    TwoTower(**kwargs).init(RNG, image, tokens)


def test_two_tower_init_shapes_for_big_model():
  # SigLIP B/16-style config, checked without allocating real params.
  model = TwoTower(image=dict(variant="B/16", pool_type="map"),
                   text=dict(vocab_size=32_000, max_len=64, variant="B"), embed_dim=None)
  shapes = jax.eval_shape(model.init, RNG, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32),
                          jax.ShapeDtypeStruct((2, 64), jnp.int32))
  names = flatten_dict(shapes["params"], sep="/")
  assert names["img/pos_embedding"].shape == (1, 196, 768)
  assert names["txt/pos_embedding"].shape == (1, 64, 768)
  assert names["img/MAPHead_0/probe"].shape == (1, 1, 768)
  assert "txt/Transformer/encoderblock_11/LayerNorm_1/scale" in names
