"""The trainer end to end on the embedded dataset: start-up errors, exact resume, the pod
recipes' runlocal variants, and `evaluate` on the latest checkpoint."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from big_vlp import checkpoint, flops, perf, sharding
from big_vlp.config_errors import ConfigError
from big_vlp.evaluate import evaluate
from big_vlp.run_setup import make_run_spec
from big_vlp.train import train
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def demo_config(data_dir, extra=""):
  arg = (f"runlocal,data={SMALL},eval_data={SMALL},data_dir={data_dir},tokenizer=bytes"
         + ("," + extra if extra else ""))
  return load_config("demo", arg)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(config, workdir):
  ckpt = checkpoint.Checkpointer(workdir, every=0, keep=10)
  step = ckpt.latest_step()
  meta = ckpt.restore_meta(step)
  shapes = {"image": jax.ShapeDtypeStruct((config.batch_size, *meta["image_shape"]), "float32"),
            "text": jax.ShapeDtypeStruct((config.batch_size, meta["text_len"]), "int32")}
  spec = make_run_spec(config, sharding.mesh_from_config(config), meta["vocab_size"], shapes)
  state, _ = ckpt.restore(step, spec.abstract_state)
  ckpt.close()
  return step, jax.device_get(state)


@pytest.mark.parametrize("field,value,pattern", [
    ("loss", "hinge", r"config\.loss='hinge'.*allowed values: 'softmax', 'sigmoid'"),
    ("model.image.variant", "Q/16", r"model\.image\.variant.*'Q/16'.*mu.*Ti.*So400m"),
    ("batch_size", 36, r"config\.batch_size=36.*divisible by the data-parallel size 8"),
    ("optim.name", "adam_typo", r"optim\.name='adam_typo'.*'adamw', 'adafactor'"),
    ("model.text.pool_type", "cls", r"model\.text\.pool_type='cls'.*'last', 'first'"),
    ("loss_impl", "ring", r"config\.loss_impl='ring'.*'global', 'sharded'"),
    ("nan_policy", "ignore", r"config\.nan_policy='ignore'.*'skip', 'stop'"),
    ("accum_steps", 3, r"batch_size=32.*data-parallel size 8 times accum_steps=3"),
    ("accum_steps", 0, r"config\.accum_steps=0.*positive integer"),
    ("mesh.tensor", 3, r"config\.mesh=.*use 3 devices.*8 available"),
    ("model.image.remat", "some", r"model\.image\.remat='some'.*'none', 'full'"),
    ("model.image.posemb", "rope", r"model\.image\.posemb='rope'.*'learn', 'sincos2d'"),
    ("optim.mu_dtype", "fp8", r"optim\.mu_dtype='fp8'.*'float32', 'bfloat16'"),
    ("data.shards", 3, r"batch_size=32.*divisible by data\.shards=3"),
    ("distributed.mode", "maybe", r"distributed\.mode='maybe'.*'auto', 'on', 'off'"),
    ("data.max_skip_fraction", 2.0, r"data\.max_skip_fraction=2\.0.*\[0, 1\]"),
    ("optim.schedule.warmup_steps", -1, r"warmup_steps=-1.*total_steps"),
])
def test_malformed_config_fails_at_start_up(tmp_path, field, value, pattern):
  config = demo_config(str(tmp_path / "no_data_needed"))
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=pattern):
    train(config, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "no_data_needed")  # Failed before touching data.


def test_cli_reports_config_error(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(8))
  proc = subprocess.run(
      [sys.executable, "-m", "big_vlp.train", "--config",
       os.path.join(ROOT, "configs", "demo.py") + ":runlocal,loss=contrastive",
       "--workdir", str(tmp_path / "wd")], capture_output=True, text=True, env=env,
      cwd=ROOT, timeout=300)
  assert proc.returncode != 0
  assert "config.loss='contrastive'" in proc.stderr and "'sigmoid'" in proc.stderr


@pytest.mark.long
def test_resume_equals_uninterrupted_run(tmp_path, shapes_dir):
  # A mixture of two sources where some examples fail pre-processing (dropped, counted):
  # the checkpoint must hold each source's exact stream position.
  config = demo_config(shapes_dir, f"steps=12,data={SMALL}:3+{SMALL}:1")
  config.data.mixture.big_vlp_shapes_small_.split = "val"
  config.data.pp = "fail_on_label(0, 5, 9, 30)|" + config.data.pp
  config.ckpt_every = 4
  config.log_every = 1
  config.evals = {}
  train(config, str(tmp_path / "straight"))
  # Interrupted twice, at a checkpoint boundary and between checkpoints.
  train(config, str(tmp_path / "resumed"), stop_at=4)
  train(config, str(tmp_path / "resumed"), stop_at=7)
  train(config, str(tmp_path / "resumed"))
  step_a, a = final_params(config, str(tmp_path / "straight"))
  step_b, b = final_params(config, str(tmp_path / "resumed"))
  assert step_a == step_b == 12
  jax.tree.map(np.testing.assert_array_equal, a, b)  # Bitwise: params, moments, rng, step.
  losses_a = {m["step"]: m["train/loss"] for m in read_metrics(str(tmp_path / "straight"))}
  events_b = read_metrics(str(tmp_path / "resumed"))
  losses_b = {m["step"]: m["train/loss"] for m in events_b}
  assert losses_a == losses_b and sorted(losses_a) == list(range(1, 13))
  assert [m["step"] for m in events_b] == list(range(1, 13))  # No duplicated events.
  skipped_a = [m["data/skipped"] for m in read_metrics(str(tmp_path / "straight"))]
  assert skipped_a == [m["data/skipped"] for m in events_b] and skipped_a[-1] > 0


@pytest.mark.parametrize("recipe", ["siglip_b16", "clip_b16"])
def test_pod_recipes_run_locally(tmp_path, shapes_dir, recipe):
  full = load_config(recipe, "")
  assert full.batch_size == 32_768 and full.model.image.variant == "B/16"
  config = load_config(recipe, f"runlocal,data_dir={shapes_dir}")
  results = train(config, str(tmp_path / "wd"))
  events = read_metrics(str(tmp_path / "wd"))
  assert events[-1]["step"] == config.total_steps
  assert all(np.isfinite(e["train/loss"]) for e in events if "train/loss" in e)
  assert set(results) >= {"zeroshot/top1", "retrieval/i2t_r1"}
  # Speed accounting: model FLOPs from the config, MFU against the measured CPU peak.
  train_events = [e for e in events if "train/loss" in e]
  count = flops.two_tower_flops(config.model, (64, 64, 3), 16, config.batch_size)
  assert train_events[0]["train/model_flops_per_example"] == count.train_per_example
  assert train_events[0]["train/startup_s"] >= train_events[0]["train/first_step_s"] > 0
  timed = [e for e in train_events if "train/mfu" in e]
  assert len(timed) == config.total_steps - 1  # Every step after the compiled first one.
  for e, peak in zip(timed, logged_peaks(timed, train_events[0]["train/peak_flops"])):
    assert 0 < e["train/mfu"] <= 1 and 0 <= e["train/input_wait_fraction"] <= 1
    assert e["train/mfu"] == pytest.approx(count.train_per_step / e["train/step_time_s"] / peak)


def logged_peaks(events, first_peak):
  """The peak each event's MFU is against: the last train/peak_flops logged up to it."""
  peaks, peak = [], first_peak
  for e in events:
    peak = e.get("train/peak_flops", peak)
    peaks.append(peak)
  return peaks


def test_busy_startup_peak_is_measured_again(tmp_path, shapes_dir, monkeypatch):
  # As if the start-up matmul had been timed while the machine was busy: a CPU peak far
  # below what the machine does. The first timed window's MFU comes out far above 1, so
  # the trainer measures the peak again, logs it, and reports MFU against it.
  config = demo_config(shapes_dir, "steps=5")
  config.log_every = 1
  config.evals = {}
  dtype = perf.compute_dtype(config.model)
  # 1 MFLOP/s; the process's own figure is put back after the test, whatever happens.
  monkeypatch.setitem(perf._measured, (dtype, 2048), 1e6)
  train(config, str(tmp_path / "wd"))
  events = [e for e in read_metrics(str(tmp_path / "wd")) if "train/loss" in e]
  assert events[0]["train/peak_flops"] == 1e6
  timed = [e for e in events if "train/mfu" in e]
  remeasured = [e for e in timed if "train/peak_flops" in e]
  assert len(remeasured) == 1 and remeasured[0] is timed[0]
  assert remeasured[0]["train/peak_flops"] > 1e8  # A real CPU's rate.
  assert perf._measured[(dtype, 2048)] == remeasured[0]["train/peak_flops"]
  count = flops.two_tower_flops(config.model, (64, 64, 3), 16, config.batch_size)
  for e, peak in zip(timed, logged_peaks(timed, 1e6)):
    assert peak > 1e8 and 0 < e["train/mfu"] <= 1
    assert e["train/mfu"] == pytest.approx(count.train_per_step / e["train/step_time_s"] / peak)


def test_evaluate_latest_checkpoint_writes_json(tmp_path, shapes_dir):
  config = demo_config(shapes_dir, "steps=6")
  workdir = str(tmp_path / "wd")
  trained = train(config, workdir)
  result = evaluate(config, workdir)
  with open(os.path.join(workdir, "eval_results.json")) as f:
    on_disk = json.load(f)
  assert on_disk["step"] == 6
  assert set(on_disk["results"]["retrieval"]) == {
      "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
  assert set(on_disk["results"]["zeroshot"]) >= {"top1", "top5"}
  for key, value in result["metrics"].items():
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(trained[key], abs=1e-6)  # Same params, same numbers.
