"""Learning test: a short demo run on the embedded dataset ends far above chance."""

import importlib.util
import json
import os

import numpy as np
import pytest

from big_vlp.data import shapes
from big_vlp.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("loss", ["sigmoid"])
def test_demo_learns_far_above_chance(tmp_path, loss):
  data_dir = str(tmp_path / "tfds")
  shapes.ensure_built(data_dir)  # The full default dataset, as the demo uses it.
  spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config(f"loss={loss},steps=150,data_dir={data_dir}")
  config.ckpt_every = 150
  workdir = str(tmp_path / "wd")
  results = train(config, workdir)

  # 48 balanced classes: chance is 1/48 = 0.021 top-1 and 5/48 = 0.104 top-5.
  assert results["zeroshot/top1"] > 0.08, results
  assert results["zeroshot/top5"] > 0.40, results
  # 1,000 held-out pairs: chance is 0.001 R@1 and 0.01 R@10.
  assert results["retrieval/i2t_r10"] > 0.04, results
  assert results["retrieval/t2i_r10"] > 0.04, results
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [e["train/loss"] for e in map(json.loads, f) if "train/loss" in e]
  # Below the plateau of a model that ignores the inputs: with one positive among n pairs
  # per row, the best constant logit gives n * H(1/n) nats (5.85 for n = 128).
  n = config.batch_size
  plateau = -(np.log(1 / n) + (n - 1) * np.log(1 - 1 / n))
  assert losses[-1] < 0.9 * plateau < losses[0], (plateau, losses)
