"""Learning test: a short demo run on the embedded dataset ends far above chance.

It runs the README's default job command (150 steps instead of 500) in a subprocess on one
CPU device, as a user's laptop runs it: the 8 simulated devices of the other tests would
split two cores eight ways and double the step time. Sharded steps are checked against one
device in test_train_step / test_multihost.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from big_vlp.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 150
BATCH = 128  # configs/demo.py's batch size; the loss plateau below depends on it.


@pytest.mark.long
def test_demo_learns_far_above_chance(tmp_path):
  data_dir = str(tmp_path / "tfds")
  shapes.ensure_built(data_dir)  # The full default dataset, as the demo uses it.
  workdir = str(tmp_path / "wd")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
      [sys.executable, "-m", "big_vlp.train",
       "--config",
       f"configs/demo.py:loss=sigmoid,steps={STEPS},data_dir={data_dir},eval_every={STEPS}",
       f"--config.ckpt_every={STEPS}", f"--config.batch_size={BATCH}", "--workdir", workdir],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    entries = [json.loads(line) for line in f]
  results = [e for e in entries if "zeroshot/top1" in e]
  assert results and results[-1]["step"] == STEPS, entries[-3:]
  results = results[-1]

  # 48 balanced classes: chance is 1/48 = 0.021 top-1 and 5/48 = 0.104 top-5.
  assert results["zeroshot/top1"] > 0.08, results
  assert results["zeroshot/top5"] > 0.40, results
  # 1,000 held-out pairs: chance is 0.001 R@1 and 0.01 R@10.
  assert results["retrieval/i2t_r10"] > 0.04, results
  assert results["retrieval/t2i_r10"] > 0.04, results
  losses = [e["train/loss"] for e in entries if "train/loss" in e]
  # Below the plateau of a model that ignores the inputs: with one positive among n pairs
  # per row, the best constant logit gives n * H(1/n) nats (5.85 for n = 128).
  plateau = -(np.log(1 / BATCH) + (BATCH - 1) * np.log(1 - 1 / BATCH))
  assert losses[-1] < 0.9 * plateau < losses[0], (plateau, losses)
