"""The README's data workflow end to end, through the documented commands only: build a
corpus of img2dataset tars (some samples broken), a multi-caption jsonl folder and a class
folder with tools/build_dataset.py, then train on a mixture of the two corpora with
`python -m big_vlp.train` and config arguments alone."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from corpus_fixtures import write_classes, write_folder, write_webdataset
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS=xla_flags(8))


def run(*args, timeout=600):
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                        env=ENV, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def build(fmt, inputs, name, data_dir, split=None):
  args = [os.path.join(ROOT, "tools", "build_dataset.py"), "--format", fmt, "--name", name,
          "--data_dir", data_dir, "--workers", "2", "--no_progress"]
  for path in inputs:
    args += ["--input", path]
  if split:
    args += ["--split", split]
  run(*args)
  with open(os.path.join(data_dir, name, "1.0.0", f"build_summary_{split or 'train'}.json"
                         if fmt != "classes" else
                         f"build_summary_{split or 'test'}.json")) as f:
    return json.load(f)


@pytest.mark.long
def test_build_from_tars_and_class_folder_then_train(tmp_path):
  tars = str(tmp_path / "tars")
  expected = write_webdataset(tars, 4, 40, corrupt=[3, 50], empty_captions=[7],
                              missing_txt=[90], size=48)
  data_dir = str(tmp_path / "tfds")
  train_summary = build("webdataset", [os.path.join(tars, "0000{0..2}.tar")], "mycorpus",
                        data_dir)
  val_summary = build("webdataset", [os.path.join(tars, "00003.tar")], "mycorpus", data_dir,
                      split="val")
  assert (train_summary["examples_written"] + val_summary["examples_written"]
          == expected["written"] == 4 * 40 - 4)
  skipped = {r: train_summary["skipped"].get(r, 0) + val_summary["skipped"].get(r, 0)
             for r in set(train_summary["skipped"]) | set(val_summary["skipped"])}
  assert skipped == expected["skipped"]
  write_folder(str(tmp_path / "coco_like"), 60, "jsonl", multi_caption=True, size=48)
  build("folder", [str(tmp_path / "coco_like")], "mycaps", data_dir)  # Several captions each.
  classes = ["red circle", "blue square", "green triangle", "yellow circle"]
  write_classes(str(tmp_path / "classes"), classes, 4, size=48)
  build("classes", [str(tmp_path / "classes")], "myclasses", data_dir)

  workdir = str(tmp_path / "wd")
  config = os.path.join(ROOT, "configs", "demo.py") + (
      f":runlocal,steps=6,batch=16,data=mycorpus:3+mycaps:1,data_dir={data_dir},"
      "eval_data=myclasses,retrieval_data=mycorpus,"
      "eval_split=test,retrieval_split=val,tokenizer=sp_train:64")
  run("-m", "big_vlp.train", "--config", config, "--workdir", workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    events = [json.loads(line) for line in f]
  losses = [e["train/loss"] for e in events if "train/loss" in e]
  assert len(losses) >= 2 and np.all(np.isfinite(losses))
  final = {k: v for e in events for k, v in e.items()}
  assert 0 <= final["zeroshot/top1"] <= 1 and 0 <= final["retrieval/i2t_r10"] <= 1
  assert final["data/skipped"] == 0  # The build already removed the broken samples.
  assert final["data/examples/mycorpus"] > final["data/examples/mycaps"] > 0
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))
