"""Model FLOP counts against XLA's cost analysis, the peak table, and tools/benchmark.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vlp import flops, losses, perf
from big_vlp.models import common
from big_vlp.models.two_towers import TwoTower

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


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
  peak, source = perf.peak_flops("float32", override=2e9)
  assert peak == 2e9 * jax.device_count() and source == "config.peak_flops"
  peak, source = perf.peak_flops("float32")
  assert source.startswith("measured") and peak > 1e8


def run_benchmark(tmp_path, *extra):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--config",
       "configs/demo.py:runlocal=True", "--steps", "2", "--rounds", "2", "--json", str(out),
       *extra], capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout, json.loads(out.read_text())


def test_benchmark_tool_big_vlp_half(tmp_path):
  stdout, res = run_benchmark(tmp_path, "--batch", "16")
  ours = res["big_vlp"]
  assert res["batch"] == 16 and res["res"] == 64 and res["vocab"] == 256
  assert ours["step_s"] > 0 and ours["img_per_sec"] == pytest.approx(16 / ours["step_s"])
  assert 0 < ours["mfu"] <= 1 and ours["compile_s"] > 0 and ours["compiled_bytes"] > 0
  assert np.isfinite(ours["final_loss"]) and len(ours["round_step_s"]) == 2
  # The analytic count is what XLA compiles, give or take elementwise work and AdamW.
  assert res["xla_flops_per_step"] >= res["model_flops_per_step"]
  assert res["xla_flops_per_step"] < 1.3 * res["model_flops_per_step"]
  assert "big_vlp" in stdout and "MFU" in stdout


def _open_clip_python():
  for path in (os.environ.get("BIG_VLP_OPEN_CLIP_PYTHON"),
               os.path.join(ROOT, ".venv-open_clip", "bin", "python")):
    if path and os.path.exists(path):
      return path
  return None


def test_benchmark_tool_open_clip_half(tmp_path):
  python = _open_clip_python()
  if python is None:
    pytest.skip("open_clip is not installed (bash tools/install_open_clip.sh, or set "
                "BIG_VLP_OPEN_CLIP_PYTHON); the comparison half is optional")
  stdout, res = run_benchmark(tmp_path, "--compare", "open_clip", "--open_clip_python", python)
  theirs = res["open_clip"]
  assert theirs["step_s"] > 0 and np.isfinite(theirs["final_loss"])
  assert res["speedup_vs_open_clip"] == pytest.approx(
      theirs["step_s"] / res["big_vlp"]["step_s"])
  assert "big_vlp / open_clip throughput" in stdout


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
