"""Fault injection: SIGKILL a training run at random moments, resume it, compare bitwise.

  python tools/fault_inject.py --workdir /tmp/fi
  python tools/fault_inject.py --workdir /tmp/fi --kills 8 --seed 3 --steps 16 \
      --ckpt_every 2 --json /tmp/fi/report.json

First an uninterrupted reference run of the demo config (runlocal, the embedded
`big_vlp_shapes/small` dataset, byte tokenizer, no evaluators) trains to the end in
WORKDIR/reference. Then the same command is started again and again on WORKDIR/killed, and
each attempt is killed (SIGKILL to its whole process group) at a point drawn from a seeded
random.Random:

  save     the moment a checkpoint save is in progress: WORKDIR/killed/checkpoints is
           polled every millisecond for a new directory that is not a plain step number
           (orbax's `<step>.orbax-checkpoint-tmp`); the kill goes out as soon as one shows.
           If the save finishes between two polls, the attempt falls back to a step kill
           and save mode is tried again on a later attempt (a bounded number of times).
  step     a random delay (up to --max_step_delay_s, less near the end of the run) after
           the trainer prints "first step done".
  startup  a random delay before the first step (imports, input pipeline, restore, compile).

When the kills are done the command runs once more to completion. The final checkpoints of
the two runs are then restored with orbax (no abstract tree) and every leaf of `state`
(params, optimizer state, step, rng) is compared byte for byte, as is the JSON `meta`; the
per-step train/loss in metrics.jsonl must be equal floats, each step 1..steps logged once.

Prints a table of the kill points and IDENTICAL or the first mismatch. Exit status 0 when the
runs are identical and the required kills (at least one mid-save) happened, 1 otherwise;
also 1 if the trainer had to set aside an unreadable checkpoint (a kill must never leave a
complete-looking but damaged step behind).
"""

import argparse
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP = "first step done"
SET_UP = "mesh {"  # Printed once input and model are set up, before init and compilation.
# Where the trainer moves checkpoints it cannot restore; a kill must never leave one.
SET_ASIDE_DIR = "checkpoints_corrupt"
_RESUMED = re.compile(r"resumed from step (\d+)")
_TMP_STEP = re.compile(r"^\D*?(\d+)\.")
# Metrics that measure time rather than training; they differ between any two runs.
TIMING_KEYS = frozenset({"train/step_time_s", "train/img_per_sec", "train/eta_s",
                         "train/elapsed_s", "train/input_wait_s", "train/first_step_s"})


class FaultInjectError(RuntimeError):
  """A training command failed or a bound was exceeded; the message says which."""


@dataclasses.dataclass
class Attempt:
  """One start of the training command on the killed workdir and how it ended."""
  index: int
  mode: str
  outcome: str = ""  # killed | finished | failed
  kill_s: float | None = None
  in_training: bool = False  # "first step done" had been printed at the kill.
  ckpt_before: int | None = None
  ckpt_after: int | None = None
  save_in_progress: bool = False  # A save's temporary directory was there after the kill.
  tmp_dirs: list[str] = dataclasses.field(default_factory=list)
  resumed_from: int | None = None  # What this attempt printed at start-up.
  next_resumed_from: int | None = None  # What the attempt after it printed.
  note: str = ""
  log: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True,
                 help="Creates WORKDIR/reference, WORKDIR/killed and WORKDIR/logs.")
  p.add_argument("--data_dir", default=None,
                 help="tfds data_dir for big_vlp_shapes/small (default WORKDIR/tfds; the "
                 "trainer builds the dataset there on first use).")
  p.add_argument("--kills", type=int, default=6, help="Kills to inject (at least 1).")
  p.add_argument("--seed", type=int, default=0, help="Seed of the kill points.")
  p.add_argument("--steps", type=int, default=16, help="Training steps of each run.")
  p.add_argument("--ckpt_every", type=int, default=2, help="Checkpoint period in steps.")
  p.add_argument("--batch", type=int, default=16, help="Global batch size.")
  p.add_argument("--max_step_delay_s", type=float, default=1.5,
                 help="Upper bound of the delay of a step kill after the first step.")
  p.add_argument("--no_compile_cache", dest="compile_cache", action="store_false",
                 help="Compile from scratch in every start instead of sharing JAX's "
                 "persistent compilation cache (WORKDIR/jax_cache) between all runs.")
  p.add_argument("--timeout_s", type=float, default=600.0, help="Bound on the whole run.")
  p.add_argument("--json", default=None, help="Write a JSON report here.")
  args = p.parse_args(argv)
  if args.kills < 1 or args.steps < 2 or args.ckpt_every < 1:
    p.error("need --kills >= 1, --steps >= 2, --ckpt_every >= 1")
  return args


def train_command(workdir: str, data_dir: str, steps: int, batch: int,
                  ckpt_every: int) -> list[str]:
  """The trainer's command line; running it again on `workdir` resumes."""
  config = (f"{os.path.join(ROOT, 'configs', 'demo.py')}:runlocal,steps={steps},"
            f"batch={batch},data=big_vlp_shapes/small,data_dir={data_dir},tokenizer=bytes,"
            "eval_data=none,retrieval_data=none")
  return [sys.executable, "-m", "big_vlp.train", f"--config={config}", f"--workdir={workdir}",
          "--config.log_every=1", f"--config.ckpt_every={ckpt_every}"]


def train_env(compile_cache: str | None = None) -> dict[str, str]:
  """Environment of the training processes: one CPU device, unbuffered output."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # One device: fast, and the same program in every run.
  for k in [k for k in env if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))]:
    del env[k]
  if compile_cache:  # Every start after the reference loads its programs instead of compiling.
    env.update(JAX_COMPILATION_CACHE_DIR=compile_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [x for x in [env.get("PYTHONPATH")] if x])
  return env


def _entries(ckpt_dir: str) -> dict[str, tuple[int, int]]:
  """Names in the checkpoint directory with (inode, mtime) to tell a new entry from an old."""
  out = {}
  try:
    with os.scandir(ckpt_dir) as it:
      for e in it:
        try:
          st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
          continue  # Renamed or removed while listing.
        out[e.name] = (st.st_ino, st.st_mtime_ns)
  except FileNotFoundError:
    pass
  return out


def newest_complete(ckpt_dir: str) -> int | None:
  """The newest checkpoint step on disk (orbax renames a save to its step when complete)."""
  steps = [int(n) for n in _entries(ckpt_dir) if n.isdigit()]
  return max(steps) if steps else None


def _tmp_names(entries: dict[str, tuple[int, int]],
               before: dict[str, tuple[int, int]]) -> list[str]:
  """Entries that are not a plain step number and were not there (as such) in `before`."""
  return sorted(n for n, key in entries.items() if not n.isdigit() and before.get(n) != key)


def _tmp_step(name: str) -> int | None:
  m = _TMP_STEP.match(name)
  return int(m.group(1)) if m else None


class Proc:
  """A training process in its own process group with its output in a log file."""

  def __init__(self, cmd: list[str], env: dict[str, str], log_path: str):
    self.log_path = log_path
    self._log = open(log_path, "wb")  # pylint: disable=consider-using-with
    self.t0 = time.monotonic()
    self.p = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                              cwd=ROOT, start_new_session=True)
    self._text, self._offset = "", 0

  def elapsed(self) -> float:
    """Seconds since the start."""
    return time.monotonic() - self.t0

  def output(self) -> str:
    """Everything the process has printed so far."""
    with open(self.log_path, "rb") as f:
      f.seek(self._offset)
      chunk = f.read()
    self._offset += len(chunk)
    self._text += chunk.decode("utf-8", "replace")
    return self._text

  def tail(self, lines: int = 30) -> str:
    """The last lines of the output."""
    return "\n".join(self.output().splitlines()[-lines:])

  def kill(self) -> None:
    """SIGKILL to the whole process group, then reaps the process."""
    try:
      os.killpg(self.p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    try:
      self.p.wait(timeout=60)
    finally:
      self._log.close()

  def wait(self, timeout: float) -> int:
    """Waits for the exit; kills the group and raises if it takes longer than `timeout`."""
    try:
      rc = self.p.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired as e:
      self.kill()
      raise FaultInjectError(f"timed out after {self.elapsed():.0f}s; log {self.log_path}:\n"
                             + self.tail()) from e
    self._log.close()
    return rc


def run_to_completion(cmd: list[str], env: dict[str, str], log_path: str,
                      deadline: float) -> tuple[float, dict[str, float]]:
  """Runs a training command to its end; returns (seconds, {marker: seconds to it})."""
  proc = Proc(cmd, env, log_path)
  marks: dict[str, float] = {}
  while True:
    running = proc.p.poll() is None
    text = proc.output()
    marks.update({m: proc.elapsed() for m in (SET_UP, FIRST_STEP)
                  if m not in marks and m in text})
    if not running:
      break
    if time.monotonic() > deadline:
      proc.kill()
      raise FaultInjectError(f"--timeout_s exceeded; log {log_path}:\n{proc.tail()}")
    time.sleep(0.05)
  rc = proc.wait(1)
  if rc != 0:
    raise FaultInjectError(f"training exited with status {rc}; log {log_path}:\n"
                           + proc.tail())
  return proc.elapsed(), marks


def save_steps(steps: int, every: int) -> list[int]:
  """The steps at which the trainer saves."""
  return sorted(set(range(every, steps + 1, every)) | {steps})


def attempt_once(attempt: Attempt, cmd: list[str], env: dict[str, str], ckpt_dir: str,
                 log_path: str, rng: random.Random, timing: dict[str, float],
                 args: argparse.Namespace, deadline: float) -> None:
  """Starts the command and kills it as `attempt.mode` says; fills in `attempt`."""
  attempt.ckpt_before = newest_complete(ckpt_dir)
  start = attempt.ckpt_before or 0
  before = _entries(ckpt_dir)
  remaining_steps = max(args.steps - start - 1, 0)  # Left after the first one.
  step_bound = min(args.max_step_delay_s, 0.6 * remaining_steps * timing["step_s"])
  delay = target = None
  if attempt.mode == "startup":
    delay = rng.uniform(0.5, max(0.6, 0.9 * timing["startup_s"]))
  elif attempt.mode == "step":
    delay = rng.uniform(0.0, step_bound)
  else:  # save: kill during one of the next three saves.
    upcoming = [s for s in save_steps(args.steps, args.ckpt_every) if s > start]
    target = upcoming[min(rng.randrange(3), len(upcoming) - 1)] if upcoming else args.steps
  fallback_delay = rng.uniform(0.0, step_bound)  # Drawn always: same sequence per seed.
  attempt.log = log_path
  proc = Proc(cmd, env, log_path)
  first_at = None
  kill_at = delay if attempt.mode == "startup" else None
  while True:
    if proc.p.poll() is not None:
      rc = proc.wait(1)
      attempt.kill_s = None
      attempt.outcome = "finished" if rc == 0 else "failed"
      attempt.note = (attempt.note + f" exited {rc} by itself").strip()
      break
    now = proc.elapsed()
    if first_at is None and FIRST_STEP in proc.output():
      first_at = now
      if attempt.mode == "step":
        kill_at = first_at + delay
    if attempt.mode == "save" and kill_at is None and first_at is not None:
      entries = _entries(ckpt_dir)
      fresh = [n for n in _tmp_names(entries, before)
               if (_tmp_step(n) is None or _tmp_step(n) >= target)]
      if fresh:
        kill_at = now
      else:
        done = [int(n) for n in entries if n.isdigit() and int(n) >= target
                and before.get(n) != entries[n]]
        if done:  # The save finished between two polls.
          attempt.note = f"save of step {min(done)} too fast to catch: fell back to a step kill"
          kill_at = now + fallback_delay
    if kill_at is not None and now >= kill_at:
      proc.kill()
      attempt.kill_s = now
      attempt.outcome = "killed"
      break
    if time.monotonic() > deadline:
      proc.kill()
      raise FaultInjectError(f"--timeout_s exceeded; log {log_path}:\n{proc.tail()}")
    # No save can start before the first step: poll the directory fast only from then on.
    time.sleep(0.001 if attempt.mode == "save" and first_at is not None else 0.01)
  text = proc.output()
  attempt.in_training = FIRST_STEP in text
  if first_at is not None:  # Start-up kills aim at the quickest start-up seen so far.
    seen = timing["startup_seen"]
    timing["startup_s"] = min(timing["startup_s"], first_at) if seen else first_at
    timing["startup_seen"] = True
  m = _RESUMED.search(text)
  attempt.resumed_from = int(m.group(1)) if m else None
  after = _entries(ckpt_dir)
  attempt.ckpt_after = newest_complete(ckpt_dir)
  attempt.tmp_dirs = _tmp_names(after, before)
  # Saves start after the first step is printed; before it, a changed temporary directory
  # is a dead save's being cleaned up at start-up.
  attempt.save_in_progress = (attempt.outcome == "killed" and attempt.in_training
                              and bool(attempt.tmp_dirs))
  if attempt.mode == "save" and attempt.outcome == "killed" and not attempt.save_in_progress \
      and not attempt.note:
    attempt.note = "save completed before the kill landed"
  if attempt.outcome == "failed":
    raise FaultInjectError(f"attempt {attempt.index}: training failed; log {log_path}:\n"
                           + proc.tail())


def _leaf_bytes(x: Any) -> tuple[str, tuple[int, ...], bytes]:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  a = np.asarray(jax.device_get(x))
  return str(a.dtype), a.shape, np.ascontiguousarray(a).tobytes()


def restore_checkpoint(ckpt_dir: str, step: int) -> dict[str, Any]:
  """{'state': pytree of arrays, 'meta': dict} of one checkpoint, restored without a target."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.ERROR)  # Read-only mode's notices are expected.
  mgr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    out = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return {"state": out["state"], "meta": dict(out["meta"])}
  finally:
    mgr.close()


def compare_checkpoints(ref_dir: str, other_dir: str, step: int) -> dict[str, Any]:
  """Byte-compares every leaf of two checkpoints; reports the first mismatching path."""
  import jax  # pylint: disable=import-outside-toplevel
  a, b = restore_checkpoint(ref_dir, step), restore_checkpoint(other_dir, step)
  la, ta = jax.tree_util.tree_flatten_with_path(a["state"])
  lb, tb = jax.tree_util.tree_flatten_with_path(b["state"])
  result: dict[str, Any] = {"step": step, "leaves": len(la), "identical": False,
                            "first_mismatch": None}
  if ta != tb:
    result["first_mismatch"] = "state (tree structure differs)"
    return result
  for (path, x), (_, y) in zip(la, lb):
    if _leaf_bytes(x) != _leaf_bytes(y):
      result["first_mismatch"] = "state" + jax.tree_util.keystr(path)
      return result
  for key in sorted(set(a["meta"]) | set(b["meta"])):
    if a["meta"].get(key) != b["meta"].get(key):
      result["first_mismatch"] = f"meta[{key!r}]: {a['meta'].get(key)!r} != " \
                                 f"{b['meta'].get(key)!r}"
      return result
  result["identical"] = True
  return result


def read_train_events(path: str) -> list[dict[str, Any]]:
  """The metrics.jsonl events that carry train/loss, in file order."""
  with open(path) as f:
    events = [json.loads(line) for line in f if line.strip()]
  return [e for e in events if "train/loss" in e]


def compare_metrics(ref_path: str, other_path: str, steps: int) -> dict[str, Any]:
  """Per-step train/loss equal as floats, each of steps 1..steps logged exactly once."""
  ref, other = read_train_events(ref_path), read_train_events(other_path)
  want = list(range(1, steps + 1))
  problems = []
  for name, events in (("reference", ref), ("killed", other)):
    got = [e["step"] for e in events]
    if got != want:
      dup = sorted({s for s in got if got.count(s) > 1})
      missing = sorted(set(want) - set(got))
      problems.append(f"{name} run logged steps {got} (duplicates {dup}, missing {missing})")
  loss_diff = [e["step"] for e, f in zip(ref, other)
               if e["step"] == f["step"] and e["train/loss"] != f["train/loss"]]
  if loss_diff:
    problems.append(f"train/loss differs at steps {loss_diff}")
  other_diff = sorted({k for e, f in zip(ref, other) if e["step"] == f["step"]
                       for k in set(e) & set(f) - TIMING_KEYS - {"train/loss"}
                       if e[k] != f[k]})
  return {"identical": not problems, "problems": problems,
          "other_metrics_differing": other_diff}


def plan_modes(rng: random.Random, kills: int) -> list[str]:
  """Kill modes in a seeded order: two save kills, a step and a startup kill, then random."""
  modes = ["save", "step", "save", "startup"][:kills]
  modes += [rng.choice(["save", "step", "startup"]) for _ in range(kills - len(modes))]
  rng.shuffle(modes)
  return modes


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    return f"{v:.2f}"
  return str(v)


def kill_table(attempts: list[Attempt]) -> str:
  """The attempts as a text table."""
  head = ["attempt", "mode", "kill_s", "phase", "ckpt_after", "mid_save", "next_resumed",
          "outcome", "note"]
  rows = [[_fmt(a.index), a.mode, _fmt(a.kill_s),
           ("training" if a.in_training else "startup"), _fmt(a.ckpt_after),
           _fmt(a.save_in_progress)
           + (f" ({', '.join(a.tmp_dirs)})" if a.save_in_progress else ""),
           _fmt(a.next_resumed_from), a.outcome, a.note] for a in attempts]
  widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
  legend = ("kill_s: seconds after the start; phase: before/after 'first step done'; "
            "ckpt_after: newest complete checkpoint on disk after the kill; mid_save: a "
            "save's temporary directory was there after the kill; next_resumed: 'resumed "
            "from step N' of the next start ('-': killed before restoring, or none to "
            "restore)")
  return "\n".join(["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                    for r in [head] + rows] + [legend])


def run(args: argparse.Namespace, report: dict[str, Any]) -> None:
  """Reference run, killed run, final run, comparison; fills in `report` as it goes."""
  t_start = time.monotonic()
  deadline = t_start + args.timeout_s
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.abspath(args.data_dir or os.path.join(workdir, "tfds"))
  ref_dir, killed_dir = os.path.join(workdir, "reference"), os.path.join(workdir, "killed")
  logs = os.path.join(workdir, "logs")
  for d in (ref_dir, killed_dir):
    if os.path.exists(d) and os.listdir(d):
      raise FaultInjectError(f"{d} is not empty; use a fresh --workdir")
  os.makedirs(logs, exist_ok=True)
  env = train_env(os.path.join(workdir, "jax_cache") if args.compile_cache else None)

  def cmd(wd: str) -> list[str]:
    return train_command(wd, data_dir, args.steps, args.batch, args.ckpt_every)

  print(f"reference run -> {ref_dir}", flush=True)
  ref_s, marks = run_to_completion(cmd(ref_dir), env, os.path.join(logs, "reference.log"),
                                   deadline)
  ref_first = marks.get(FIRST_STEP, ref_s / 2)
  # Start-up kills fall before this: at first the reference's set-up time (the later starts
  # load compiled programs from the cache), then the quickest first step of an attempt.
  # Step kills wait less than a fraction of the remaining steps' wall time (saves and
  # shut-down included), so that they land before the run ends.
  timing = {"total_s": ref_s, "first_step_s": ref_first,
            "startup_s": marks.get(SET_UP, ref_first / 2), "startup_seen": False,
            "step_s": max(ref_s - ref_first, 0.1) / (args.steps - 1)}
  report["reference"] = dict(timing)
  print(f"  done in {ref_s:.1f}s (first step after {ref_first:.1f}s, then "
        f"{timing['step_s']:.2f}s/step)", flush=True)

  rng = random.Random(args.seed)
  plan = plan_modes(rng, args.kills)
  ckpt_dir = os.path.join(killed_dir, "checkpoints")
  attempts: list[Attempt] = report["attempts"]
  kills = save_kills = save_retries = 0
  max_attempts = args.kills + 6
  finished = False
  while kills < args.kills or save_kills < 1:
    if len(attempts) >= max_attempts:
      report["note"] = f"gave up after {max_attempts} attempts"
      break
    mode = plan.pop(0) if plan else ("save" if save_kills < 1 else
                                     rng.choice(["save", "step", "startup"]))
    a = Attempt(index=len(attempts) + 1, mode=mode)
    attempt_once(a, cmd(killed_dir), env, ckpt_dir,
                 os.path.join(logs, f"attempt_{a.index:02d}.log"), rng, timing, args, deadline)
    if attempts:
      attempts[-1].next_resumed_from = a.resumed_from
    attempts.append(a)
    print(f"  attempt {a.index}: {a.mode:7s} {a.outcome} at {_fmt(a.kill_s)}s, newest "
          f"checkpoint {_fmt(a.ckpt_after)}, save in progress: {_fmt(a.save_in_progress)} "
          f"{a.note}", flush=True)
    if a.outcome == "finished":
      finished = True
      if kills < args.kills or save_kills < 1:
        report["note"] = ("the run finished by itself before the required kills were done "
                          "(nothing deleted); try another --seed or more --steps")
      break
    kills += 1
    save_kills += a.save_in_progress
    report["kills"], report["save_kills"] = kills, save_kills
    if mode == "save" and not a.save_in_progress and save_kills < 2 and save_retries < 4:
      save_retries += 1
      plan.insert(0, "save")  # Try again on the next attempt.
  if not finished:
    print("final run to completion", flush=True)
    log = os.path.join(logs, "final.log")
    run_to_completion(cmd(killed_dir), env, log, deadline)
    with open(log, encoding="utf-8", errors="replace") as f:
      m = _RESUMED.search(f.read())
    if attempts:
      attempts[-1].next_resumed_from = int(m.group(1)) if m else None

  report["kills"], report["save_kills"] = kills, save_kills
  report["resumed_steps"] = sorted({a.resumed_from for a in attempts if a.resumed_from}
                                   | {a.next_resumed_from for a in attempts
                                      if a.next_resumed_from})
  print(kill_table(attempts), flush=True)
  set_aside = sorted(_entries(os.path.join(killed_dir, SET_ASIDE_DIR)))
  report["set_aside"] = set_aside
  if set_aside:
    print(f"BUG: the trainer found unreadable checkpoints after the kills and set them "
          f"aside in {os.path.join(killed_dir, SET_ASIDE_DIR)}: {', '.join(set_aside)}")
  for d in (ref_dir, killed_dir):
    if not os.path.isdir(os.path.join(d, "checkpoints", str(args.steps))):
      raise FaultInjectError(f"{d} has no checkpoint of step {args.steps}")
  ckpt = compare_checkpoints(os.path.join(ref_dir, "checkpoints"), ckpt_dir, args.steps)
  metrics = compare_metrics(os.path.join(ref_dir, "metrics.jsonl"),
                            os.path.join(killed_dir, "metrics.jsonl"), args.steps)
  report["checkpoint"], report["metrics"] = ckpt, metrics
  identical = ckpt["identical"] and metrics["identical"]
  report["identical"] = identical
  report["ok"] = identical and kills >= args.kills and save_kills >= 1 and not set_aside
  report["runtime_s"] = time.monotonic() - t_start
  print(f"checkpoint step {args.steps}: {ckpt['leaves']} state leaves, "
        + ("bitwise equal" if ckpt["identical"] else f"first mismatch {ckpt['first_mismatch']}"))
  print("metrics: " + (f"per-step train/loss equal, steps 1..{args.steps} once each"
                       if metrics["identical"] else "; ".join(metrics["problems"])))
  if metrics["other_metrics_differing"]:
    print("note: other (non-timing) metrics differ: "
          + ", ".join(metrics["other_metrics_differing"]))
  print(f"kills {kills} (required {args.kills}), during a save {save_kills}"
        + (f"; {report['note']}" if report.get("note") else ""))
  print("IDENTICAL" if identical else
        f"DIFFERENT: {ckpt['first_mismatch'] or '; '.join(metrics['problems'])}")
  print(f"total {report['runtime_s']:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
  """Runs the fault injection; returns the exit status."""
  args = parse_args(argv)
  # The comparison restores checkpoints in this process: one CPU device is enough.
  os.environ.pop("XLA_FLAGS", None)
  os.environ.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  report: dict[str, Any] = {"args": vars(args), "attempts": [], "ok": False}
  try:
    run(args, report)
  except FaultInjectError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    report["error"] = str(e)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2, default=dataclasses.asdict)
  return 0 if report["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
