"""Launches a big_vlp training run on a Cloud TPU VM slice with gcloud.

  # Create a spot v5e-256 slice, ship this checkout, install, train in the foreground:
  python tools/launch_tpu.py --name my-tpu --zone us-west4-a --project my-proj \
      --accelerator_type v5litepod-256 --spot --workdir gs://my-bucket/siglip_b16 \
      --config 'configs/siglip_b16.py:data=laion400m,data_dir=gs://my-bucket/tfds' \
      --override total_steps=1000 --env TF_CPP_MIN_LOG_LEVEL=2 --delete_after

  # Reuse an existing VM and leave training running in the background:
  python tools/launch_tpu.py --name my-tpu --zone us-west4-a --reuse --detach \
      --workdir gs://my-bucket/siglip_b16 --config configs/siglip_b16.py

  # Print every gcloud command without running anything:
  python tools/launch_tpu.py ... --dry-run

Steps: describe the VM (create it unless it exists or --reuse), copy the checkout's tracked
files (working-tree contents; untracked files stay behind) to --code_dir on every worker,
make a venv there with requirements.txt plus jax[tpu] at the pinned jax version, then run
`python -m big_vlp.train` with the identical command on all workers, with
BIG_VLP_DISTRIBUTED=on so that each calls jax.distributed.initialize(), which on a TPU slice
finds the coordinator and its process id from the VM metadata: no per-worker flags. By default the tool waits for training and streams its output
(also kept in ~/big_vlp_train.log on each worker); the run then dies with the connection,
so for long runs use --detach, which starts training with nohup in the background and
returns. --delete_after deletes the VM once the foreground training command exits.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VERSION = "v2-alpha-tpuv5-lite"
REMOTE_TARBALL = "/tmp/big_vlp.tar.gz"
# Dry runs build no tarball; this stands in for the temporary file a real run writes.
PLACEHOLDER_TARBALL = os.path.join(tempfile.gettempdir(), "big_vlp-code.tar.gz")
LOG = "~/big_vlp_train.log"
LIBTPU_RELEASES = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# The pins in requirements.txt (jax, numpy, flax) need Python >= 3.11; the stock TPU VM
# images ship an older python3, so the install fails early with a hint instead of in pip.
MIN_PYTHON = (3, 11)
SKIP_DIRS = {".venv", ".git", "__pycache__", "workdir"}


class UsageError(Exception):
  """A bad flag combination or a missing prerequisite; exits with status 2."""


def key_value(flag: str, key_pattern: str) -> Callable[[str], tuple[str, str]]:
  """An argparse type that splits KEY=VALUE and checks KEY against `key_pattern`."""
  def parse(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(key_pattern, key):
      raise argparse.ArgumentTypeError(f"{flag} expects KEY=VALUE, got {text!r}")
    return key, value
  return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line (argparse exits with status 2 on errors)."""
  p = argparse.ArgumentParser(
      description=__doc__.split("\n", 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
  p.add_argument("--name", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", help="GCP project (gcloud's default when omitted)")
  p.add_argument("--accelerator_type", help="e.g. v5litepod-256; required when creating")
  p.add_argument("--version", default=DEFAULT_VERSION, help="TPU runtime software version")
  kind = p.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true", help="create a spot VM")
  kind.add_argument("--preemptible", action="store_true", help="create a preemptible VM")
  p.add_argument("--reuse", action="store_true", help="never create; the VM must exist")
  p.add_argument("--workdir", required=True, help="training workdir, e.g. gs://bucket/path")
  p.add_argument("--config", required=True, help="e.g. configs/siglip_b16.py:data=...")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 type=key_value("--override", r"[A-Za-z_][\w.]*"),
                 help="passed to training as --config.KEY=VALUE (repeatable)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 type=key_value("--env", r"[A-Za-z_]\w*"),
                 help="environment variable for the training processes (repeatable)")
  p.add_argument("--code_dir", default="~/big_vlp", help="checkout location on the workers")
  p.add_argument("--python", default="python3", help="remote interpreter for the venv")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print every command, run nothing")
  p.add_argument("--detach", action="store_true",
                 help="start training in the background (nohup) and return")
  p.add_argument("--delete_after", action="store_true",
                 help="delete the VM when the training command exits")
  return p.parse_args(argv)


def jax_pin(requirements: str = os.path.join(ROOT, "requirements.txt")) -> str:
  """The version that requirements.txt pins jax to (`jax==X`)."""
  try:
    with open(requirements) as f:
      for line in f:
        m = re.match(r"\s*jax(\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
          return m.group(2)
  except OSError as e:
    raise UsageError(f"cannot read {requirements}: {e}") from e
  raise UsageError(f"no 'jax==VERSION' pin found in {requirements}")


def remote_path(path: str) -> str:
  """Shell-quotes a remote path but leaves a leading ~/ unquoted so that it expands."""
  if path == "~" or path.startswith("~/"):
    return "~" + (("/" + shlex.quote(path[2:])) if path[2:] else "")
  return shlex.quote(path)


def gcloud(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
  """One `gcloud compute tpus tpu-vm VERB ...` argv with --zone and --project."""
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, "--zone", args.zone]
  return cmd + (["--project", args.project] if args.project else [])


def ssh(args: argparse.Namespace, command: str) -> list[str]:
  """Runs the shell `command` on every worker of the VM."""
  return gcloud(args, "ssh", args.name, "--worker=all", "--command", command)


def describe_command(args: argparse.Namespace) -> list[str]:
  """Prints the VM's state; fails when the VM does not exist."""
  return gcloud(args, "describe", args.name, "--format=value(state)")


def train_command(args: argparse.Namespace) -> str:
  """The remote shell command that starts training (identical on every worker)."""
  # Every worker joins the slice's jax.distributed run (coordinator and process ids are
  # detected from the TPU VM metadata); --env can still override it.
  env_vars = dict([("BIG_VLP_DISTRIBUTED", "on"), *args.env])  # A later --env wins.
  env = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_vars.items())
  train = " ".join(
      ["python", "-m", "big_vlp.train", "--config", shlex.quote(args.config),
       "--workdir", shlex.quote(args.workdir)]
      + [shlex.quote(f"--config.{k}={v}") for k, v in args.override])
  start = f"cd {remote_path(args.code_dir)} && . .venv/bin/activate && "
  prefix = f"{env} " if env else ""
  if args.detach:
    # All three fds redirected so that ssh does not wait for the background process.
    return start + f"({prefix}nohup {train} > {LOG} 2>&1 < /dev/null &)"
  return start + f"set -o pipefail && {prefix}{train} 2>&1 | tee {LOG}"


def plan_commands(args: argparse.Namespace, exists: bool,
                  tarball: str = PLACEHOLDER_TARBALL) -> list[list[str]]:
  """Every gcloud command after the existence check, in order; runs nothing."""
  cmds = []
  if not exists:
    create = gcloud(args, "create", args.name, "--accelerator-type",
                    str(args.accelerator_type), "--version", args.version)
    cmds.append(create + ["--spot"] * args.spot + ["--preemptible"] * args.preemptible)
  code = remote_path(args.code_dir)
  cmds.append(gcloud(args, "scp", tarball, f"{args.name}:{REMOTE_TARBALL}", "--worker=all"))
  cmds.append(ssh(args, f"mkdir -p {code} && tar -xzf {REMOTE_TARBALL} -C {code} "
                        f"&& rm -f {REMOTE_TARBALL}"))
  py = shlex.quote(args.python)
  need = ".".join(map(str, MIN_PYTHON))
  check = (f"{py} -c 'import sys; sys.exit(sys.version_info < {MIN_PYTHON})' || "
           f"{{ echo 'big_vlp needs Python >= {need}; pass --python python{need}' >&2; "
           "exit 1; }")
  cmds.append(ssh(args, " && ".join([
      f"cd {code}", check, f"{py} -m venv .venv", ". .venv/bin/activate",
      "pip install -q -U pip", "pip install -q -r requirements.txt -e .",
      f"pip install -q {shlex.quote(f'jax[tpu]=={jax_pin()}')} -f {LIBTPU_RELEASES}"])))
  cmds.append(ssh(args, train_command(args)))
  if args.delete_after:
    cmds.append(gcloud(args, "delete", args.name, "--quiet"))
  return cmds


def code_files(root: str = ROOT) -> list[str]:
  """Paths (relative to `root`) to ship: git's tracked files, else a filtered walk."""
  try:
    out = subprocess.run(["git", "-C", root, "ls-files", "-z"], check=True,
                         capture_output=True).stdout.decode()
    files = [f for f in out.split("\0") if f]
  except (OSError, subprocess.CalledProcessError):
    files = []
    for d, dirs, names in os.walk(root):
      dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
      files += [os.path.relpath(os.path.join(d, n), root) for n in sorted(names)]
  # A tracked file deleted in the working tree is not shipped.
  return [f for f in files if os.path.lexists(os.path.join(root, f))]


def make_tarball(files: list[str], path: str, root: str = ROOT) -> None:
  """Writes `files` (relative to `root`) into the gzipped tarball `path`."""
  with tarfile.open(path, "w:gz") as tar:
    for f in files:
      tar.add(os.path.join(root, f), arcname=f, recursive=False)


def run(cmd: list[str], dry_run: bool) -> None:
  """Prints `cmd` shell-quoted, then runs it unless this is a dry run."""
  print(shlex.join(cmd), flush=True)
  if not dry_run:
    subprocess.run(cmd, check=True)


def vm_state(args: argparse.Namespace) -> str | None:
  """The VM's state (e.g. READY), or None when describe fails (no such VM)."""
  cmd = describe_command(args)
  print(shlex.join(cmd), flush=True)
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode:
    print(f"# describe failed: {result.stderr.strip()}", flush=True)
    return None
  return result.stdout.strip()


def launch(args: argparse.Namespace) -> int:
  """Carries out the steps; returns the exit code."""
  jax_pin()  # Fails before anything runs when requirements.txt has no pin.
  if args.detach and args.delete_after:
    raise UsageError("--delete_after would delete the VM under a --detach run")
  if not args.dry_run and shutil.which("gcloud") is None:
    raise UsageError("gcloud not found on PATH; install the Google Cloud SDK "
                     "(or use --dry-run to only print the commands)")
  if args.dry_run:
    print(shlex.join(describe_command(args)))
    exists = args.reuse  # Assumed, so that a dry run shows the create command.
  else:
    state = vm_state(args)
    exists = state is not None
    if exists and state != "READY":
      print(f"launch_tpu: TPU VM {args.name} is {state}, not READY (a preempted spot VM "
            "must be deleted and created again)", file=sys.stderr)
      return 1
  if not exists and args.reuse:
    print(f"launch_tpu: TPU VM {args.name} not found in zone {args.zone} and --reuse "
          "was given; drop --reuse to create it", file=sys.stderr)
    return 1
  if not exists and not args.accelerator_type:
    raise UsageError("--accelerator_type is required to create a TPU VM")
  files = code_files()
  tarball = PLACEHOLDER_TARBALL
  if not args.dry_run:
    fd, tarball = tempfile.mkstemp(prefix="big_vlp-", suffix=".tar.gz")
    os.close(fd)
  cmds = plan_commands(args, exists, tarball)
  delete = cmds.pop() if args.delete_after else None
  train = cmds.pop()
  try:
    print(f"# pack {len(files)} files from {ROOT} into {tarball}", flush=True)
    if not args.dry_run:
      make_tarball(files, tarball)
    for cmd in cmds:
      run(cmd, args.dry_run)
  finally:
    if not args.dry_run:
      os.remove(tarball)
  status = 0
  try:
    run(train, args.dry_run)
  except subprocess.CalledProcessError as e:
    print(f"launch_tpu: training exited with code {e.returncode}", file=sys.stderr)
    status = e.returncode or 1
  # Deleted whether training succeeded or failed, but not on Ctrl-C (it propagates past
  # this line), which may only mean "stop watching".
  if delete:
    run(delete, args.dry_run)
  if args.detach:
    tail = gcloud(args, "ssh", args.name, "--worker=0", "--command", f"tail -f {LOG}")
    print(f"# training started in the background; follow it with: {shlex.join(tail)}")
  return status


def main(argv: list[str] | None = None) -> int:
  """Entry point; returns the process exit code."""
  args = parse_args(argv)
  try:
    return launch(args)
  except UsageError as e:
    print(f"launch_tpu: error: {e}", file=sys.stderr)
    return 2
  except subprocess.CalledProcessError as e:
    print(f"launch_tpu: command failed with exit code {e.returncode}: "
          f"{shlex.join(e.cmd)}", file=sys.stderr)
    if args.delete_after:
      print(f"launch_tpu: the VM was not deleted; once done with it: "
            f"{shlex.join(gcloud(args, 'delete', args.name, '--quiet'))}", file=sys.stderr)
    return e.returncode or 1
  except KeyboardInterrupt:
    print("launch_tpu: interrupted; a running VM was left as it is", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
