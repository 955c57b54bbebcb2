"""Orbax checkpoints holding everything needed to continue a run exactly.

Each step directory holds two items: 'state' (params, optimizer state, step, rng) and
'meta' (JSON: examples consumed per process, model/data fingerprint). Saves are async;
orbax writes to a temporary directory ('<step>.orbax-checkpoint-tmp', never listed as a
step, replaced when that step is saved again) and renames it when complete, so an
interrupted save never replaces the last good checkpoint.

Faults:
  * A step that cannot be restored (truncated or garbled files, a missing item) is reported,
    moved to WORKDIR/checkpoints_corrupt/<step>-<time> and the next older step is tried
    (`latest_meta`, `restore_latest`); with none left the run starts from scratch, loudly.
  * A checkpoint whose state tree does not fit the model is not damage: StateMismatchError,
    nothing is moved.
  * A failed save (disk full, quota) raises RuntimeError naming the step and the previous
    checkpoint, which stays intact, whether it fails at once or in the background.
"""

import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from big_vlp.tree_paths import path_str

CORRUPT_DIR = "checkpoints_corrupt"
_MAX_ERROR_CHARS = 400


class Restored(NamedTuple):
  """A usable checkpoint: its step, JSON meta and state (None when only the meta was read)."""
  step: int
  meta: dict[str, Any]
  state: Any


class StateMismatchError(RuntimeError):
  """A checkpoint's state tree does not fit the model being built (config or code change)."""


def _one_line(error: BaseException) -> str:
  text = str(error)
  # Tensorstore appends a dump of its spec (pages); the head names the cause.
  for marker in (" See full TensorStore details", " [tensorstore_spec="):
    text = text.split(marker)[0]
  text = " ".join(text.split())
  if len(text) > _MAX_ERROR_CHARS:  # Paths fill the middle; the errno ends the message.
    half = _MAX_ERROR_CHARS // 2
    text = text[:half] + " [...] " + text[-half:]
  return f"{type(error).__name__}: {text}"


def _short(error: BaseException) -> str:
  """The error and, when it wraps others, its root cause, each on one short line."""
  root, seen = error, {id(error)}
  while (root.__cause__ or root.__context__) is not None and len(seen) < 20:
    root = root.__cause__ or root.__context__
    if id(root) in seen:
      break
    seen.add(id(root))
  return _one_line(error) + ("" if root is error else f" (cause: {_one_line(root)})")


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...] | None]:
  shapes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", None)  # None: a leaf kind without one, not compared.
    # Orbax metadata trees use dict / sequence keys where the live state has attributes
    # (optax NamedTuples); path_str gives the same bare names for both.
    shapes[path_str(path)] = None if shape is None else tuple(shape)
  return shapes


def state_mismatch(abstract_state: Any, stored: Any, limit: int = 8) -> list[str]:
  """Lines describing where a stored state tree's paths or shapes differ from the model's."""
  want, have = _shapes_by_path(abstract_state), _shapes_by_path(stored)
  lines = []
  # Parameters first: they name the layer; optimizer moments repeat them.
  for p in sorted(set(want) | set(have), key=lambda p: (not p.startswith("params/"), p)):
    if p not in have:
      lines.append(f"{p}: in the model {want[p]}, not in the checkpoint")
    elif p not in want:
      lines.append(f"{p}: in the checkpoint {have[p]}, not in the model")
    elif None not in (have[p], want[p]) and have[p] != want[p]:
      lines.append(f"{p}: checkpoint {have[p]} vs model {want[p]}")
  return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds on every process, so all of them fall back together."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the project's item layout."""

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    # Bucket paths (gs://...) pass through; local ones are made absolute for orbax.
    base = workdir if "://" in workdir else os.path.abspath(workdir)
    self.directory = str(epath.Path(base) / "checkpoints")
    self.corrupt_directory = str(epath.Path(base) / CORRUPT_DIR)
    self.every = int(every)
    self.set_aside: list[str] = []  # Where this process moved unusable steps to.
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            # Not cleanup_tmp_directories: in orbax 0.12.8 its background removal races
            # with the next save of the same step (FileNotFoundError); a save replaces a
            # leftover temporary directory of its step by itself.
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        # Named handlers let item_metadata() read the state's tree without restoring it.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
    )
    self._durable = self._mgr.latest_step()  # Newest step known to be complete on disk.
    self._in_flight: int | None = None  # Step of an async save not yet waited for.
    self._save_failed = False

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints."""
    return sorted(self._mgr.all_steps())

  def should_save(self, step: int, total_steps: int) -> bool:
    """True on every `every` steps and on the final step."""
    return step == total_steps or (self.every > 0 and step % self.every == 0)

  # ---- saving ------------------------------------------------------------------------

  def _failed(self, step: int, error: BaseException) -> RuntimeError:
    prev = (f"the previous checkpoint {self._durable} is intact" if self._durable is not None
            else "there is no earlier checkpoint")
    return RuntimeError(f"saving checkpoint {step} failed: {_short(error)}; {prev} "
                        f"(in {self.directory})")

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an async save of state + meta at `step`; raises if it or the previous failed."""
    self.wait()  # Orbax waits here anyway; doing it first names the step that failed.
    try:
      self._mgr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:
      self._save_failed = True
      raise self._failed(step, e) from e
    self._in_flight = step

  def wait(self) -> None:
    """Blocks until pending async saves are durable; RuntimeError if one failed."""
    if self._in_flight is None:
      return
    step, self._in_flight = self._in_flight, None
    try:
      self._mgr.wait_until_finished()
    except Exception as e:
      self._save_failed = True
      raise self._failed(step, e) from e
    self._durable = step

  def close(self) -> None:
    """Waits for saves and releases resources."""
    try:
      self.wait()
    except RuntimeError:
      self._close_quietly()
      raise
    if self._save_failed:
      self._close_quietly()
    else:
      self._mgr.close()

  def _close_quietly(self) -> None:
    # Orbax re-raises a failed save on every later wait; it has been reported once.
    try:
      self._mgr.close()
    except Exception:  # pylint: disable=broad-except
      pass

  # ---- restoring ---------------------------------------------------------------------

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta); shardings come from the abstract state's leaves."""
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_meta(self, step: int) -> dict[str, Any]:
    """Only the JSON metadata of a checkpoint."""
    out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    if not isinstance(out["meta"], dict):  # Garbled into valid JSON of another kind.
      raise ValueError(f"meta of checkpoint {step} is a {type(out['meta']).__name__}, "
                       "not a JSON object")
    return dict(out["meta"])

  def _restore_checked(self, step: int, abstract_state: Any) -> Restored:
    """Restores `step` after checking that its state tree fits `abstract_state`."""
    stored = self._mgr.item_metadata(step)["state"]  # Unreadable: damage.
    if stored is None:
      raise ValueError("the checkpoint has no readable 'state' item")
    try:
      diff = state_mismatch(abstract_state, stored)
    except Exception:  # pylint: disable=broad-except
      # A metadata layout this check does not know is no reason to call the step damaged.
      diff = []
    if diff:
      raise StateMismatchError(
          f"checkpoint {step} in {self.directory} holds a train state that does not fit "
          "this model (a config or code change?):\n  " + "\n  ".join(diff)
          + "\nUse a new workdir, or restore with the code and config that wrote it.")
    state, meta = self.restore(step, abstract_state)
    return Restored(step, meta, state)

  def latest_meta(self) -> Restored | None:
    """Newest checkpoint whose meta reads (state not restored); unreadable ones set aside."""
    return self._newest_usable(lambda step: Restored(step, self.restore_meta(step), None))

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """Newest checkpoint that restores fully; unreadable ones set aside, None if none left."""
    return self._newest_usable(lambda step: self._restore_checked(step, abstract_state))

  def _newest_usable(self, load: Callable[[int], Restored]) -> Restored | None:
    while True:
      steps = self.all_steps()
      if not steps:
        if self.set_aside and jax.process_index() == 0:
          print(f"WARNING: no usable checkpoint is left in {self.directory} (set aside: "
                f"{', '.join(self.set_aside)}); THE RUN STARTS AGAIN FROM STEP 0.",
                file=sys.stderr, flush=True)
        return None
      step, error, found = steps[-1], None, None
      try:
        found = load(step)
      except StateMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if _all_processes_agree(error is None):
        return found
      self._set_aside_step(step, error)

  def _set_aside_step(self, step: int, error: BaseException | None) -> None:
    """Moves `step` out of orbax's directory (process 0; the others wait) and re-lists."""
    src = epath.Path(self.directory) / str(step)
    dest = epath.Path(self.corrupt_directory) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      base, n = dest.name, 1
      while dest.exists():  # Set aside before within the same second.
        dest, n = dest.with_name(f"{base}-{n}"), n + 1
      why = _short(error) if error is not None else "failed to restore on another process"
      print(f"checkpoint {step} cannot be restored ({why}); moving {src} to {dest} and "
            "trying the previous checkpoint", file=sys.stderr, flush=True)
      try:
        src.rename(dest)
      except Exception as e:
        raise RuntimeError(f"could not move the unusable checkpoint {src} aside ({_short(e)})"
                           "; move or delete it by hand and start again") from e
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"big_vlp_checkpoint_set_aside_{step}")
    self.set_aside.append(str(dest))
    self._mgr.reload()  # Orbax caches the step list.
    if self._durable == step:
      self._durable = self._mgr.latest_step()
