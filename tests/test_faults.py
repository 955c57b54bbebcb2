"""Stop requests and numerical faults: SIGTERM saves and exits 75; non-finite steps are
skipped and counted ('skip') or end the run with a report ('stop')."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from big_vlp.preemption import EXIT_PREEMPTED
from big_vlp.train import NonFiniteError, train
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)
from test_train_e2e import demo_config, final_params, read_metrics
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_saves_the_current_step_and_exits_75(tmp_path, shapes_dir):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "big_vlp.train",
         f"--config=configs/demo.py:runlocal,batch=16,data={SMALL},"
         f"data_dir={shapes_dir},tokenizer=bytes,eval_data=none,retrieval_data=none",
         f"--workdir={workdir}", "--config.ckpt_every=1000", "--config.log_every=1",
         # Far more steps than it can run before the signal: it must not finish first.
         "--config.total_steps=100000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  deadline = time.time() + 240
  for line in proc.stdout:  # Wait until training runs, then preempt it.
    lines.append(line)
    if "first step done" in line or time.time() > deadline:
      break
  time.sleep(0.3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  out = "".join(lines) + out
  assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
  assert "SIGTERM received" in out and "stopped by SIGTERM after step" in out
  step = int(out.split("stopped by SIGTERM after step ")[1].split(";")[0])
  assert 0 < step < 100000
  # The only checkpoint is the one the signal asked for (periodic ones are every 1000).
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)]
  with open(workdir / "metrics.jsonl") as f:
    assert max(json.loads(line)["step"] for line in f) == step


def _nan_config(shapes_dir, policy):
  # Examples of class 7 get NaN images: about 1 batch in 2 holds one.
  config = demo_config(shapes_dir, "steps=8,batch=32")
  config.data.pp = config.data.pp.replace("decode|", "decode|nan_on_label(7)|", 1)
  config.nan_policy = policy
  config.log_every = 1
  config.ckpt_every = 8
  config.evals = {}
  return config


def test_nan_policy_skip_counts_and_keeps_state_finite(tmp_path, shapes_dir):
  config = _nan_config(shapes_dir, "skip")
  train(config, str(tmp_path))
  events = [e for e in read_metrics(str(tmp_path)) if "train/loss" in e]
  counts = [e["train/nonfinite_steps"] for e in events]
  bad = [e["step"] for e in events if not np.isfinite(float(e["train/loss"]))]
  assert bad and counts[-1] == len(bad) < len(events)  # Every NaN step counted, once.
  _, state = final_params(config, str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert all(np.isfinite(np.asarray(x, np.float64)).all()
             for x in jax.tree.leaves(state["opt_state"]))
  assert int(state["nonfinite"]["count"]) == len(bad)
  assert int(state["nonfinite"]["last_step"]) == bad[-1]


def test_nan_policy_stop_names_the_step_and_last_good_checkpoint(tmp_path, shapes_dir):
  config = _nan_config(shapes_dir, "stop")
  config.ckpt_every = 1
  with pytest.raises(NonFiniteError) as e:
    train(config, str(tmp_path))
  events = [e for e in read_metrics(str(tmp_path)) if "train/loss" in e]
  first_bad = next(e["step"] for e in events if not np.isfinite(float(e["train/loss"])))
  msg = str(e.value)
  assert f"last at step {first_bad} (loss nan" in msg
  assert f"Last good checkpoint: {first_bad - 1 if first_bad > 1 else 'none'}" in msg
  assert "nan_policy='stop'" in msg
  ckpts = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert max(ckpts, default=0) == first_bad - 1  # Nothing saved after the bad step.


def test_a_failing_evaluator_is_reported_and_training_goes_on(tmp_path, shapes_dir, capfd):
  config = demo_config(shapes_dir, "steps=4")
  # Zero-shot hits an example its pp cannot process (at every evaluation); retrieval is fine.
  config.evals.zeroshot.pp = config.evals.zeroshot.pp.replace("decode|",
                                                              "decode|fail_on_label(3)|")
  config.evals.zeroshot.every = config.evals.retrieval.every = 2
  results = train(config, str(tmp_path))
  assert "retrieval/i2t_r1" in results and not any(k.startswith("zeroshot/") for k in results)
  events = read_metrics(str(tmp_path))
  assert [e["step"] for e in events if "zeroshot/error" in e] == [2, 4]
  assert any("retrieval/t2i_r10" in e for e in events)
  assert max(e["step"] for e in events if "train/loss" in e) == 4
  assert "evaluator 'zeroshot' failed at step 2" in capfd.readouterr().err
