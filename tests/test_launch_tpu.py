"""tools/launch_tpu.py: the gcloud commands a --dry-run prints (nothing is run)."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "launch_tpu.py")
BASE = ["--name", "my-tpu", "--zone", "us-west4-a", "--workdir", "gs://b/run",
        "--config", "configs/siglip_b16.py:data=laion,data_dir=gs://b/tfds", "--dry-run"]


def load_tool():
  spec = importlib.util.spec_from_file_location("launch_tpu", TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(autouse=True)
def fake_gcloud(tmp_path, monkeypatch):
  """A `gcloud` first on PATH that records any call, so a test fails if one happens."""
  marker = tmp_path / "gcloud_called"
  script = tmp_path / "bin" / "gcloud"
  script.parent.mkdir()
  script.write_text(f"#!/bin/sh\necho \"$@\" >> {shlex.quote(str(marker))}\nexit 1\n")
  script.chmod(0o755)
  monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
  yield
  assert not marker.exists(), f"gcloud was invoked: {marker.read_text()}"


def launch(*extra, ok=True):
  """Runs the tool as a script; returns the completed process."""
  proc = subprocess.run([sys.executable, TOOL, *BASE, *extra], capture_output=True,
                        text=True, timeout=30)
  if ok:
    assert proc.returncode == 0, proc.stderr
  return proc


def commands(*extra):
  """The printed commands (comments dropped), each split back into its argv."""
  out = launch(*extra).stdout
  return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def verb(cmd):
  return cmd[4] if cmd[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] else None


def remote(cmd):
  """The shell command an ssh argv runs on the workers."""
  return cmd[cmd.index("--command") + 1]


def train_of(cmds):
  return next(c for c in cmds if verb(c) == "ssh" and "big_vlp.train" in remote(c))


def pinned_jax():
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    return re.search(r"^jax==(\S+)", f.read(), re.M).group(1)


def test_create_has_type_version_zone_project_spot():
  cmds = commands("--accelerator_type", "v5litepod-256", "--version", "v2-alpha-tpuv5-lite",
                  "--project", "my-proj", "--spot")
  assert [verb(c) for c in cmds] == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  create = cmds[1]
  for flag, value in [("--accelerator-type", "v5litepod-256"),
                      ("--version", "v2-alpha-tpuv5-lite"), ("--zone", "us-west4-a"),
                      ("--project", "my-proj")]:
    assert create[create.index(flag) + 1] == value
  assert "my-tpu" in create and "--spot" in create and "--preemptible" not in create
  assert all(c[c.index("--project") + 1] == "my-proj" for c in cmds)
  assert "--preemptible" in commands("--accelerator_type", "v4-32", "--preemptible")[1]


def test_reuse_skips_create_and_needs_no_accelerator_type():
  cmds = commands("--reuse")
  assert [verb(c) for c in cmds] == ["describe", "scp", "ssh", "ssh", "ssh"]
  assert all("--project" not in c for c in cmds)


def test_create_without_accelerator_type_is_a_usage_error():
  proc = launch(ok=False)
  assert proc.returncode == 2 and "--accelerator_type" in proc.stderr


def test_copy_and_install_run_on_all_workers_with_pinned_jax():
  cmds = commands("--reuse")
  scp, untar, install = cmds[1], cmds[2], cmds[3]
  assert "--worker=all" in scp
  assert scp[6] == "my-tpu:/tmp/big_vlp.tar.gz"
  assert "--worker=all" in untar and "tar -xzf /tmp/big_vlp.tar.gz -C ~/big_vlp" in remote(untar)
  assert "--worker=all" in install
  line = remote(install)
  assert "python3 -m venv .venv" in line and "pip install -q -r requirements.txt -e ." in line
  assert f"jax[tpu]=={pinned_jax()}" in shlex.split(line)
  assert "libtpu_releases.html" in line


def test_train_command_quotes_config_overrides_env_and_workdir():
  workdir = "gs://b/my run $HOME"
  cmds = commands("--reuse", "--workdir", workdir, "--override", "total_steps=10",
                  "--override", "data.name=a b", "--env", "MY_FLAG=x y", "--env", "N=1")
  train = train_of(cmds)
  assert "--worker=all" in train
  line = remote(train)
  assert "python -m big_vlp.train" in line and "cd ~/big_vlp" in line
  argv = shlex.split(line)
  assert argv[argv.index("--workdir") + 1] == workdir
  assert argv[argv.index("--config") + 1] == (
      "configs/siglip_b16.py:data=laion,data_dir=gs://b/tfds")
  assert "--config.total_steps=10" in argv and "--config.data.name=a b" in argv
  assert "MY_FLAG=x y" in argv and "N=1" in argv
  # Every worker joins the slice's jax.distributed run (big_vlp.distributed).
  assert "BIG_VLP_DISTRIBUTED=on" in argv
  assert argv.index("MY_FLAG=x y") < argv.index("python")
  assert "tee" in argv and "nohup" not in argv  # Foreground by default.


def test_detach_uses_nohup_in_the_background():
  line = remote(train_of(commands("--reuse", "--detach")))
  assert "nohup python -m big_vlp.train" in line and line.endswith("&)")
  proc = launch("--reuse", "--detach", "--delete_after", ok=False)
  assert proc.returncode == 2 and "--delete_after" in proc.stderr


def test_delete_after_adds_the_delete_last():
  cmds = commands("--reuse", "--delete_after")
  assert verb(cmds[-1]) == "delete" and "my-tpu" in cmds[-1] and "--quiet" in cmds[-1]
  assert "delete" not in [verb(c) for c in commands("--reuse")]


@pytest.mark.parametrize("flag,value", [("--override", "foo"), ("--env", "noequals"),
                                        ("--env", "1BAD=x")])
def test_bad_key_value_exits_2_naming_the_flag(flag, value):
  proc = launch("--reuse", flag, value, ok=False)
  assert proc.returncode == 2
  assert flag in proc.stderr and value in proc.stderr


def test_missing_jax_pin_is_an_error(tmp_path):
  tool = load_tool()
  req = tmp_path / "requirements.txt"
  req.write_text("jaxlib==1.0\nnumpy==2.0\n")
  with pytest.raises(tool.UsageError, match="jax==VERSION"):
    tool.jax_pin(str(req))
  req.write_text("# pinned\njaxlib==1.0\njax == 9.8.7  # comment\n")
  assert tool.jax_pin(str(req)) == "9.8.7"


def test_plan_commands_matches_the_dry_run_output():
  tool = load_tool()
  extra = ["--accelerator_type", "v5litepod-256", "--project", "p", "--spot",
           "--override", "x=1", "--env", "A=b", "--delete_after"]
  args = tool.parse_args(BASE + extra)
  expected = [tool.describe_command(args)] + tool.plan_commands(args, exists=False)
  assert commands(*extra) == expected
  args = tool.parse_args(BASE + ["--reuse"])
  assert commands("--reuse") == [tool.describe_command(args)] + tool.plan_commands(args, True)


def test_code_files_are_the_tracked_files():
  files = load_tool().code_files()
  assert "big_vlp/train.py" in files and "requirements.txt" in files
  assert not any(f.startswith((".venv/", ".git/")) or "__pycache__" in f for f in files)
