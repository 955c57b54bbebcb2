"""Model FLOP counts against XLA's cost analysis, the peak table, and tools/benchmark.py."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vlp import flops, losses, losses_caption, losses_silc, perf, recipes
from big_vlp.models import common
from big_vlp.models.two_towers import TwoTower
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "benchmark.py")


def xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def abstract_params(model, image, tokens):
  """Shapes of every param (decoder, DINO head included): XLA's cost analysis needs no values."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, tokens,
                                           method="init_all"))["params"]


def test_matmul_and_encoder_block_counts_match_xla():
  x = jnp.ones((2, 24, 64))
  block = common.EncoderBlock(mlp_dim=256, num_heads=4)
  params = block.init(jax.random.PRNGKey(0), x)
  counted = xla_flops(block.apply, params, x)
  analytic = 2 * flops.encoder_fwd(24, 64, 1, 256)  # Two sequences.
  # XLA also counts LayerNorm, GELU, softmax and residual adds: a few percent on top.
  assert analytic <= counted <= 1.05 * analytic, (counted, analytic)
  assert flops.encoder_fwd(24, 64, 3, 256) == 3 * flops.encoder_fwd(24, 64, 1, 256)


@pytest.mark.parametrize("image_pool,text_pool,patch,res,length", [
    ("map", "last", 8, 64, 16), ("gap", "gap", 16, 96, 24), ("tok", "map", 8, 32, 8)])
def test_two_tower_forward_and_train_counts_match_xla(image_pool, text_pool, patch, res,
                                                      length):
  width, batch = 96, 6
  model_cfg = {
      "image": {"width": width, "depth": 2, "mlp_dim": 4 * width, "num_heads": 4,
                "patch_size": patch, "pool_type": image_pool},
      "text": {"width": width, "depth": 2, "mlp_dim": 4 * width, "num_heads": 4,
               "pool_type": text_pool, "vocab_size": 64, "max_len": length},
      "embed_dim": 48}
  model = TwoTower(model_cfg["image"], model_cfg["text"], embed_dim=48)
  image = jnp.zeros((batch, res, res, 3))
  text = jnp.ones((batch, length), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), image, text)

  def loss_fn(p, image, text):
    zimg, ztxt, sb = model.apply(p, image, text)
    return losses.sigmoid_loss(zimg, ztxt, sb["scale"], sb["bias"])

  count = flops.two_tower_flops(model_cfg, (res, res, 3), length, batch)
  fwd = xla_flops(loss_fn, params, image, text)
  train = xla_flops(jax.grad(loss_fn), params, image, text)
  assert count.forward_per_example * batch <= fwd <= 1.06 * count.forward_per_example * batch
  assert count.train_per_step <= train <= 1.06 * count.train_per_step
  # The backward pass is twice the forward one, except the image needs no gradient.
  assert count.train_per_example == pytest.approx(
      3 * count.forward_per_example - count.patch_embed_fwd)
  assert count.loss_fwd == 2 * batch * 48


def _caption_model(text: bool, image_pool: str, decoder_width: int, tie: bool):
  """A small CoCa (text tower + decoder) or CapPa (decoder only) config and its TwoTower."""
  width, vocab, length = 96, 64, 12
  model_cfg = {
      "image": {"width": width, "depth": 1, "mlp_dim": 4 * width, "num_heads": 4,
                "patch_size": 8, "pool_type": image_pool},
      "text": ({"width": width, "depth": 1, "mlp_dim": 4 * width, "num_heads": 4,
                "vocab_size": vocab, "max_len": length} if text else None),
      "embed_dim": 48 if text else None,
      # vocab_size is left out, as in configs: the count takes it as an argument.
      "decoder": {"width": decoder_width, "depth": 1, "mlp_dim": 4 * decoder_width,
                  "num_heads": 4, "max_len": length, "tie_embedding": tie}}
  model = TwoTower(model_cfg["image"], model_cfg["text"], embed_dim=model_cfg["embed_dim"],
                   decoder={**model_cfg["decoder"], "vocab_size": vocab})
  return model_cfg, model, vocab, length


@pytest.mark.parametrize("text,image_pool,decoder_width,tie,locked,image_mask", [
    (True, "map", 128, False, (), 0.0),  # CoCa; image_proj to the decoder's width.
    (False, "map", 96, True, (), 0.0),  # CapPa: no text tower, no contrastive loss.
    (True, "gap", 96, False, ("img",), 0.0),  # Locked image tower: no context gradient.
    (True, "tok", 128, False, (), 0.5)])  # FLIP: the decoder attends the kept tokens.
def test_caption_counts_match_xla(text, image_pool, decoder_width, tie, locked, image_mask):
  model_cfg, model, vocab, length = _caption_model(text, image_pool, decoder_width, tie)
  batch, res = 4, 32
  image = jnp.zeros((batch, res, res, 3))
  tokens = jnp.ones((batch, length), jnp.int32)
  params = abstract_params(model, image, tokens)

  def loss_fn(p):
    zimg, ztxt, out = model.apply({"params": p}, image, tokens, train=True, caption=True,
                                  locked=locked, image_mask=image_mask,
                                  rngs={"mask": jax.random.PRNGKey(1)})
    loss, _ = losses_caption.caption_loss(out["caption_logits"], tokens, 0)
    if ztxt is not None:
      loss = loss + losses.sigmoid_loss(zimg, ztxt, out["scale"], out["bias"])
    return loss

  phase = recipes.Phase(locked=locked, image_mask=image_mask)
  count = flops.two_tower_flops(model_cfg, (res, res, 3), length, batch, phase,
                                vocab_size=vocab)
  fwd = xla_flops(loss_fn, params)
  train = xla_flops(jax.grad(loss_fn), params)
  assert count.forward_per_example * batch <= fwd <= 1.06 * count.forward_per_example * batch
  assert count.train_per_step <= train <= 1.06 * count.train_per_step
  assert (count.text_fwd > 0) == text and (count.loss_fwd > 0) == text
  assert count.decoder_fwd > 0 and (count.decoder_context_fwd > 0)
  with pytest.raises(ValueError, match="vocabulary size"):
    flops.two_tower_flops(model_cfg, (res, res, 3), length, batch, phase)


def test_decoder_count_formula():
  d, mlp, depth, length, n, w_img, vocab = 64, 256, 3, 10, 16, 32, 100
  kwargs = {"width": d, "depth": depth, "mlp_dim": mlp, "num_heads": 4, "vocab_size": vocab}
  total, context = flops.decoder_fwd(kwargs, length, n, w_img)
  block = (4 * 2 * length * d * d + 2 * 2 * length * length * d  # Self-attention.
           + 2 * 2 * length * d * d + 2 * 2 * n * d * d + 2 * 2 * length * n * d  # Cross.
           + 2 * 2 * length * d * mlp)
  assert context == 2 * n * w_img * d + depth * 2 * 2 * n * d * d
  assert total == 2 * n * w_img * d + depth * block + 2 * length * d * vocab
  # No image_proj when the widths agree; an explicit vocab_size wins over the argument.
  assert flops.decoder_fwd(kwargs, length, n, d, 7)[1] == depth * 2 * 2 * n * d * d


def test_silc_counts_match_xla():
  width, batch, res, local_res, n_local, n_global, k = 96, 4, 32, 16, 4, 2, 256
  head = {"num_prototypes": k, "hidden_dim": 128, "bottleneck_dim": 32, "num_layers": 3}
  model_cfg = {
      "image": {"width": width, "depth": 1, "mlp_dim": 4 * width, "num_heads": 4,
                "patch_size": 8, "pool_type": "map"},
      "text": {"width": width, "depth": 1, "mlp_dim": 4 * width, "num_heads": 4,
               "vocab_size": 64, "max_len": 8},
      "embed_dim": 48}
  model = TwoTower(model_cfg["image"], model_cfg["text"], embed_dim=48, dino=head)
  image = jnp.zeros((batch, res, res, 3))
  tokens = jnp.ones((batch, 8), jnp.int32)
  local = jnp.zeros((batch * n_local, local_res, local_res, 3))
  glob = jnp.zeros((batch * n_global, res, res, 3))
  params = abstract_params(model, image, tokens)
  ema = {key: params[key] for key in ("img", "dino_head")}

  def views(logits, v):  # [B * V, K] example-major -> [V, B, K], as train_step lays them.
    return jnp.swapaxes(logits.reshape(batch, v, k), 0, 1)

  def loss_fn(p, ema):  # What train_step runs with SILC: contrastive + DINO loss.
    teacher = jax.lax.stop_gradient(views(model.apply(
        {"params": {**p, **ema}}, glob, method="dino_logits"), n_global))
    zimg, ztxt, out = model.apply({"params": p}, image, tokens, train=True)
    student = views(model.apply({"params": p}, local, train=True, method="dino_logits"),
                    n_local)
    return (losses.sigmoid_loss(zimg, ztxt, out["scale"], out["bias"])
            + losses_silc.dino_loss(student, teacher, jnp.zeros((k,)),
                                    student_has_globals=False))

  count = flops.two_tower_flops(model_cfg, (res, res, 3), 8, batch, silc=head,
                                local_shape=(n_local, local_res, local_res, 3),
                                global_shape=(n_global, res, res, 3))
  fwd = xla_flops(loss_fn, params, ema)
  train = xla_flops(jax.grad(loss_fn), params, ema)
  assert count.forward_per_example * batch <= fwd <= 1.06 * count.forward_per_example * batch
  assert count.train_per_step <= train <= 1.06 * count.train_per_step
  # The parts: towers without the `head` projection (dino_logits reads the pooled features).
  dino = 2 * (width * 128 + 128 * 128 + 128 * 32 + 32 * k)
  assert flops.dino_head_fwd(head, width) == dino
  local_tower, local_embed = flops.image_fwd(model_cfg["image"], local_res, local_res)
  global_tower, _ = flops.image_fwd(model_cfg["image"], res, res)
  assert count.silc_fwd == n_local * (local_tower + dino)
  assert count.silc_patch_embed_fwd == n_local * local_embed
  assert count.teacher_fwd == n_global * (global_tower + dino)
  assert count.silc_loss_fwd == 2 * n_global * n_local * k
  # Without global crops the teacher sees the image itself (G = 1).
  plain = flops.two_tower_flops(model_cfg, (res, res, 3), 8, batch, silc=head,
                                local_shape=(n_local, local_res, local_res, 3))
  assert plain.teacher_fwd == global_tower + dino
  with pytest.raises(ValueError, match="local_shape"):
    flops.two_tower_flops(model_cfg, (res, res, 3), 8, batch, silc=head)


@pytest.mark.parametrize("image,text_width,published", [
    ("B/32", 512, 14.78), ("B/16", 512, 41.09), ("L/14", 768, 175.33)])
def test_counts_match_open_clip_published_gflops(image, text_width, published):
  # open_clip's model profile (REFERENCE.md): forward GFLOPs per image + 77-token text,
  # class-token ViTs, 12-layer text towers of the given width.
  model_cfg = {"image": {"variant": image, "pool_type": "tok"},
               "text": {"width": text_width, "depth": 12, "mlp_dim": 4 * text_width,
                        "num_heads": text_width // 64}}
  count = flops.two_tower_flops(model_cfg, (224, 224, 3), 77, 1)
  assert (count.image_fwd + count.text_fwd) / 1e9 == pytest.approx(published, abs=0.01)


def test_peak_table_and_measured_cpu_peak():
  assert perf.table_peak("TPU v5 lite", "bfloat16") == 197e12
  assert perf.table_peak("TPU v4", "float32") == 275e12
  assert perf.table_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert perf.table_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert perf.table_peak("NVIDIA A100-SXM4-40GB", "float32") == 156e12
  assert perf.table_peak("cpu", "float32") is None
  measured = perf.measure_matmul_peak("float32", n=512, seconds=0.2)
  assert 1e8 < measured < 1e14  # A real rate, not 0 or inf.
  assert perf.measure_matmul_peak("float32", n=512, seconds=0.2) == measured  # Cached.
  # Measured again: the best of all measurements, never lower than the first.
  assert perf.measure_matmul_peak("float32", n=512, seconds=0.2, again=True) >= measured
  peak, source = perf.peak_flops("float32", override=2e9)
  assert peak == 2e9 * jax.device_count() and source == "config.peak_flops"
  assert not perf.is_measured(source)
  peak, source = perf.peak_flops("float32")
  assert perf.is_measured(source) and peak > 1e8


def run_benchmark(tmp_path, *extra):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--config",
       "configs/demo.py:runlocal=True", "--steps", "2", "--rounds", "2", "--json", str(out),
       *extra], capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": xla_flags()})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout, json.loads(out.read_text())


def test_benchmark_tool_big_vlp_half(tmp_path):
  stdout, res = run_benchmark(tmp_path, "--batch", "16")
  ours = res["big_vlp"]
  assert res["batch"] == 16 and res["res"] == 64 and res["vocab"] == 256
  assert ours["step_s"] > 0 and ours["img_per_sec"] == pytest.approx(16 / ours["step_s"])
  assert 0 < ours["mfu"] <= 1 and ours["compile_s"] > 0 and ours["compiled_bytes"] > 0
  # The CPU peak MFU is taken against is measured again after every round, best kept.
  assert res["peak_source"].endswith("best of measurements between rounds")
  assert ours["mfu"] == pytest.approx(res["model_flops_per_step"] / ours["step_s"]
                                      / res["peak_flops"])
  assert np.isfinite(ours["final_loss"]) and len(ours["round_step_s"]) == 2
  # The analytic count is what XLA compiles, give or take elementwise work and AdamW.
  assert res["xla_flops_per_step"] >= res["model_flops_per_step"]
  assert res["xla_flops_per_step"] < 1.3 * res["model_flops_per_step"]
  assert "big_vlp" in stdout and "MFU" in stdout
  # The allocator the entry point restarted with (big_vlp.allocator) is reported.
  assert res["malloc"] in ("tcmalloc", "jemalloc", "glibc", "custom")
  assert f"malloc {res['malloc']}" in stdout
  # What the process spent per step meanwhile (getrusage), the measure of the allocator.
  assert ours["user_cpu_s_per_step"] > 0 and ours["system_cpu_s_per_step"] >= 0
  assert ours["page_faults_per_step"] >= 0 and "page faults" in stdout


def test_benchmark_tool_open_clip_half(tmp_path, open_clip_python):
  stdout, res = run_benchmark(tmp_path, "--compare", "open_clip", "--open_clip_python",
                              open_clip_python)
  theirs = res["open_clip"]
  assert theirs["step_s"] > 0 and np.isfinite(theirs["final_loss"])
  assert res["speedup_vs_open_clip"] == pytest.approx(
      theirs["step_s"] / res["big_vlp"]["step_s"])
  assert res["round_speedups_vs_open_clip"] == pytest.approx(
      [o / b for o, b in zip(theirs["round_step_s"], res["big_vlp"]["round_step_s"])])
  assert "big_vlp / open_clip throughput" in stdout and "per round" in stdout
  assert res["open_clip_malloc"] == "same"


def test_open_clip_worker_environment_with_or_without_the_allocator(monkeypatch):
  monkeypatch.syspath_prepend(os.path.dirname(TOOL))  # As when run as a script.
  spec = importlib.util.spec_from_file_location("benchmark_tool", TOOL)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  env = {"PATH": "/bin", "LD_PRELOAD": "libtcmalloc_minimal.so.4", "MALLOC_CONF": "x",
         "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "BIG_VLP_MALLOC_ACTIVE": "tcmalloc"}
  assert tool.worker_environment(dict(env), "same") == env
  assert tool.worker_environment(dict(env), "glibc") == {"PATH": "/bin"}


def test_benchmark_without_open_clip_says_how_to_install(tmp_path):
  if os.path.exists(os.path.join(ROOT, ".venv-open_clip", "bin", "python")):
    pytest.skip("an open_clip environment exists in the checkout")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--config",
       "configs/demo.py:runlocal=True", "--compare", "open_clip", "--open_clip_python",
       str(tmp_path / "missing" / "python")], capture_output=True, text=True, timeout=300,
      env={k: v for k, v in os.environ.items() if k != "BIG_VLP_OPEN_CLIP_PYTHON"},
      cwd=str(tmp_path))
  assert proc.returncode != 0
  assert "install_open_clip.sh" in proc.stderr
