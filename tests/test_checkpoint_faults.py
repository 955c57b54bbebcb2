"""Checkpoint faults: damaged newest checkpoints are set aside and the previous one used, a
workdir refuses a config its checkpoints do not fit, and a save that hits a full disk fails
loudly while the previous checkpoint stays usable."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from big_vlp import checkpoint, run_compat, sharding
from big_vlp.config_errors import ConfigError
from big_vlp.run_setup import make_run_spec
from big_vlp.train import train
from data_fixtures import SMALL, shapes_dir  # noqa: F401  (pytest fixture)
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A failed restore leaves orbax's sibling read coroutines unawaited; they are reported when
# garbage-collected, in whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
# The CLI's config (steps=8, a checkpoint every 2 steps), in-process and on the command line.
ARG = f"runlocal,steps=8,batch=16,data={SMALL},tokenizer=bytes,eval_data=none,retrieval_data=none"


def make_config(data_dir: str):
  spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"{ARG},data_dir={data_dir}")
  config.ckpt_every = 2
  config.log_every = 1
  return config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, shapes_dir):
  """A run stopped after step 6 of 8 with checkpoints 2, 4 and 6; tests work on copies."""
  workdir = str(tmp_path_factory.mktemp("base") / "wd")
  train(make_config(shapes_dir), workdir, stop_at=6)
  return workdir


def copy_run(base: str, tmp_path) -> str:
  workdir = str(tmp_path / "wd")
  shutil.copytree(base, workdir)
  return workdir


def steps_on_disk(workdir: str) -> list[int]:
  ckpt = checkpoint.Checkpointer(workdir, every=0, keep=10)
  steps = ckpt.all_steps()
  ckpt.close()
  return steps


def logged_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def largest_file(directory: str) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


# ---- damaged checkpoints -------------------------------------------------------------

def test_orbax_ignores_interrupted_saves(base_run, tmp_path):
  workdir = copy_run(base_run, tmp_path)
  # What a save killed half-way leaves behind (orbax writes there, then renames), with
  # and without the suffix some orbax versions add.
  for name in ("8.orbax-checkpoint-tmp", "10.orbax-checkpoint-tmp-1234567"):
    shutil.copytree(os.path.join(workdir, "checkpoints", "6"),
                    os.path.join(workdir, "checkpoints", name))
  ckpt = checkpoint.Checkpointer(workdir, every=0, keep=10)
  assert ckpt.all_steps() == [2, 4, 6] and ckpt.latest_meta().step == 6
  ckpt.close()
  assert not os.path.exists(os.path.join(workdir, checkpoint.CORRUPT_DIR))


def test_damaged_checkpoints_are_set_aside_and_the_run_resumes(base_run, shapes_dir, tmp_path,
                                                              capfd):
  workdir = copy_run(base_run, tmp_path)
  ckpts = os.path.join(workdir, "checkpoints")
  # Step 6: garbled meta JSON (found before the model is built). Step 4: a truncated array
  # file (found when the state is restored, after the input was positioned for step 4).
  with open(os.path.join(ckpts, "6", "meta", "metadata"), "w") as f:
    f.write('{"step": 6, "examples_se')
  data = largest_file(os.path.join(ckpts, "4", "state"))
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  train(make_config(shapes_dir), workdir)
  out, err = capfd.readouterr()
  assert "checkpoint 6 cannot be restored (" in err and "JSON" in err
  assert "checkpoint 4 cannot be restored (" in err
  assert "resumed from step 2 (32 examples seen)" in out
  moved = sorted(os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR)))
  assert [m.split("-")[0] for m in moved] == ["4", "6"]
  assert steps_on_disk(workdir) == [4, 6, 8]  # Written again by the resumed run.
  assert logged_steps(workdir) == list(range(1, 9))




def test_no_usable_checkpoint_left_means_a_loud_fresh_start(base_run, shapes_dir, tmp_path,
                                                           capfd):
  workdir = copy_run(base_run, tmp_path)
  ckpts = os.path.join(workdir, "checkpoints")
  data = largest_file(os.path.join(ckpts, "6", "state"))
  size = os.path.getsize(data)
  with open(data, "r+b") as f:  # Garbage of the same size: only decoding can tell.
    f.seek(size // 3)
    f.write(os.urandom(size // 3))
  shutil.rmtree(os.path.join(ckpts, "4", "meta"))
  os.remove(os.path.join(ckpts, "2", "state", "manifest.ocdbt"))
  config = make_config(shapes_dir)
  shapes = {"image": jax.ShapeDtypeStruct((16, 64, 64, 3), "float32"),
            "text": jax.ShapeDtypeStruct((16, 16), "int32")}
  spec = make_run_spec(config, sharding.mesh_from_config(config), 258, shapes)
  ckpt = checkpoint.Checkpointer(workdir, every=2, keep=3)
  assert ckpt.latest_meta().step == 6  # Its meta is fine; its arrays are not.
  assert ckpt.restore_latest(spec.abstract_state) is None
  ckpt.close()
  err = capfd.readouterr().err
  assert "checkpoint 6 cannot be restored (" in err and "ZSTD" in err
  assert "checkpoint 4 cannot be restored (KeyError: 'Item \"meta\" was not found" in err
  assert "checkpoint 2 cannot be restored (" in err and "does not exist" in err
  assert "WARNING: no usable checkpoint is left" in err and "FROM STEP 0" in err
  assert len(os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))) == 3
  assert os.listdir(ckpts) == []

# ---- a workdir refuses a config its checkpoints do not fit ----------------------------

def test_config_diff_lines():
  old = {"loss": "sigmoid", "total_steps": 8, "freeze": [],
         "model": {"image": {"width": 128, "scan": False}, "embed_dim": 32},
         "optim": {"name": "adamw", "lr": 0.001, "mu_dtype": "float32"}}
  new = {"loss": "sigmoid", "total_steps": 20, "freeze": ["img"], "allow_config_change": True,
         "model": {"image": {"width": 256, "scan": True}, "text": {"width": 64}},
         "optim": {"name": "adamw", "lr": 0.0005}}
  state, other = run_compat.check_resume(old, new, allow_change=True)
  assert state == ["freeze: [] -> ['img']",
                   "model.embed_dim: 32 -> <absent>",
                   "model.image.scan: False -> True",
                   "model.image.width: 128 -> 256",
                   "model.text.width: <absent> -> 64",
                   "optim.mu_dtype: 'float32' -> <absent>"]
  assert other == ["optim.lr", "total_steps"]  # allow_config_change itself is not a change.
  with pytest.raises(ConfigError) as e:
    run_compat.check_resume(old, new)
  message = str(e.value)
  assert "the workdir holds a run with a different config" in message
  assert "\n  model.image.width: 128 -> 256\n" in message and "optim.lr" not in message
  assert "--config.allow_config_change=True" in message and "new --workdir" in message
  assert run_compat.check_resume(old, {**old, "total_steps": 9}) == ([], ["total_steps"])


def test_runs_from_before_matmul_dtype_resume_at_its_default():
  old = {"model": {"image": {"width": 8}, "text": {"width": 8}}}
  same = {"model": {"image": {"width": 8, "matmul_dtype": "float32"},
                    "text": {"width": 8, "matmul_dtype": "float32"}}}
  assert run_compat.check_resume(old, same) == ([], [])
  changed = {"model": {"image": {"width": 8, "matmul_dtype": "bfloat16"}, "text": {"width": 8}}}
  with pytest.raises(ConfigError, match="model.image.matmul_dtype: 'float32' -> 'bfloat16'"):
    run_compat.check_resume(old, changed)


def test_workdir_refuses_an_incompatible_config(base_run, shapes_dir, tmp_path, capfd):
  workdir = copy_run(base_run, tmp_path)
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = f.read()
  config = make_config(shapes_dir)
  config.model.image.width = 128
  config.optim.lr = 5e-4  # May change on resume: not part of the refusal.
  with pytest.raises(ConfigError) as e:
    train(config, workdir)
  assert ("meaning:\n  model.image.width: 64 -> 128\nUse a new --workdir for a new run, or "
          "set --config.allow_config_change=True") in str(e.value)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == recorded  # Nothing recorded, nothing moved.
  assert steps_on_disk(workdir) == [2, 4, 6]

  # The escape hatch hands over to the checkpoint's own check: a state that does not fit
  # the model is refused (nothing set aside), one that does is resumed.
  config.allow_config_change = True
  with pytest.raises(checkpoint.StateMismatchError,
                     match=r"checkpoint 6 .* does not fit this model.*\n  params/img/"):
    train(config, workdir)
  assert steps_on_disk(workdir) == [2, 4, 6]
  assert not os.path.exists(os.path.join(workdir, checkpoint.CORRUPT_DIR))
  config = make_config(shapes_dir)
  config.model.temperature_init = 5.0  # Only the initial value: the state's shapes stay.
  config.total_steps = 6  # Ends at the checkpoint: no step to compile.
  config.allow_config_change = True
  capfd.readouterr()
  train(config, workdir)
  out, err = capfd.readouterr()
  assert "model.temperature_init: None -> 5.0" in err
  assert "model.image.width" not in err  # Compared with the run's config, not the attempt.
  assert "resumed from step 6" in out
  assert "note: config fields changed since the previous invocation: total_steps" in out
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["temperature_init"] == 5.0
  with open(os.path.join(workdir, "config.prev.json")) as f:
    assert f.read() == recorded


# ---- a full disk during a save --------------------------------------------------------

def test_failed_save_is_loud_and_keeps_the_previous_checkpoint(base_run, shapes_dir, tmp_path,
                                                               capfd):
  workdir = copy_run(base_run, tmp_path)
  # A per-process file-size limit stands in for a full disk: every write past `limit`
  # bytes fails with EFBIG. It sits between the run's small files (config, metrics,
  # events) and the checkpoint's array files.
  ckpt_files = [os.path.join(d, f) for d, _, names in
                os.walk(os.path.join(workdir, "checkpoints", "6")) for f in names]
  largest = max(os.path.getsize(f) for f in ckpt_files)
  small = max(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(workdir)
              for f in names if "checkpoints" not in d)
  limit = 64 * 1024
  assert 4 * small < limit < largest, (small, largest)

  # The limit is set by the child itself before it imports anything: a preexec_fn would
  # run Python in a fork of this multi-threaded (JAX) process.
  limited = ("import resource, runpy, signal, sys\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a killed process\n"
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
             "runpy.run_module('big_vlp.train', run_name='__main__', alter_sys=True)\n")
  # One device: the checkpoint restores onto any mesh.
  env = dict(os.environ, XLA_FLAGS=xla_flags())
  proc = subprocess.run(
      [sys.executable, "-c", limited,
       f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:{ARG},data_dir={shapes_dir}",
       "--config.ckpt_every=2", "--config.log_every=1", f"--workdir={workdir}"],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert proc.returncode not in (0, 75), proc.stderr[-3000:]
  assert "resumed from step 6" in proc.stdout
  lines = [l for l in proc.stderr.splitlines() if l.startswith("RuntimeError: saving checkpoint")]
  assert lines and "saving checkpoint 8 failed:" in lines[-1], proc.stderr[-3000:]
  assert "File too large" in lines[-1] and "the previous checkpoint 6 is intact" in lines[-1]
  assert steps_on_disk(workdir) == [2, 4, 6]  # Step 8 never became a checkpoint...
  assert any("orbax-checkpoint-tmp" in name  # ...only an unfinished temporary directory.
             for name in os.listdir(os.path.join(workdir, "checkpoints")))

  capfd.readouterr()
  train(make_config(shapes_dir), workdir)  # Without the limit: continues from 6.
  out, err = capfd.readouterr()
  assert "resumed from step 6" in out and "cannot be restored" not in err
  assert steps_on_disk(workdir) == [4, 6, 8]
  assert logged_steps(workdir) == list(range(1, 9))
