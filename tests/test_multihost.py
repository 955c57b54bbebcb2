"""Two real JAX processes on 127.0.0.1 (gloo CPU collectives) train like one process.

The same config runs (a) in one process on 4 devices, (b) in two processes with 2 devices
each, stopped after step 3 with a checkpoint, then (c) resumed from that checkpoint in one
process on 1 device. With `data.shards=2` the global batches are the same in all three, so
the per-step losses must be too.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(data_dir, workdir, *extra):
  arg = (f"runlocal,steps={STEPS},batch=16,data={SMALL},data_dir={data_dir},tokenizer=bytes,"
         "eval_data=none,retrieval_data=none")
  return [sys.executable, "-m", "big_vlp.train", f"--config=configs/demo.py:{arg}",
          f"--workdir={workdir}", "--config.data.shards=2", "--config.log_every=1",
          "--config.ckpt_every=3", *extra]


def _env(devices, **extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             XLA_FLAGS=xla_flags(devices),
             TF_CPP_MIN_LOG_LEVEL="2", **extra)
  for key in ("BIG_VLP_COORDINATOR", "BIG_VLP_NUM_PROCESSES", "BIG_VLP_PROCESS_ID"):
    if key not in extra:
      env.pop(key, None)
  return env


def _run_all(procs):
  """Waits for every process (bounded); on any failure kills the rest and shows output."""
  outputs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT_S)
      outputs.append(out)
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise AssertionError("multi-process run timed out:\n" + "\n".join(
        p.communicate()[0][-3000:] for p in procs))
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-5000:]
  return outputs


def _start(cmd, env):
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    events = [json.loads(line) for line in f]
  by_step = {e["step"]: e["train/loss"] for e in events if "train/loss" in e}
  assert sorted(by_step) == list(range(1, STEPS + 1)), sorted(by_step)
  return np.array([by_step[s] for s in range(1, STEPS + 1)])


@pytest.mark.long
def test_two_processes_equal_one_and_resume_on_one_device(shapes_dir, tmp_path):
  ref_dir, multi_dir = str(tmp_path / "one"), str(tmp_path / "two")
  _run_all([_start(_command(shapes_dir, ref_dir), _env(4))])

  port = _free_port()
  outs = _run_all([
      _start(_command(shapes_dir, multi_dir, "--stop_at=3"),
             _env(2, BIG_VLP_COORDINATOR=f"127.0.0.1:{port}", BIG_VLP_NUM_PROCESSES="2",
                  BIG_VLP_PROCESS_ID=str(i)))
      for i in range(2)])
  assert "4 cpu device(s), 2 process(es)" in outs[0]
  assert "mesh" not in outs[1]  # Only process 0 prints and writes metrics.
  ckpt = os.path.join(multi_dir, "checkpoints")
  assert sorted(os.listdir(ckpt)) == ["3"]
  with open(os.path.join(multi_dir, "metrics.jsonl")) as f:
    assert max(json.loads(line)["step"] for line in f) == 3

  # The 2-process checkpoint (4 devices) restored onto 1 device in 1 process: the input
  # continues from the two shards' saved positions.
  out = _run_all([_start(_command(shapes_dir, multi_dir), _env(1))])[0]
  assert "resumed from step 3" in out and "1 cpu device(s), 1 process(es)" in out
  ref, multi = _losses(ref_dir), _losses(multi_dir)
  assert ref[0] != ref[-1]
  np.testing.assert_allclose(multi, ref, rtol=1e-5)
