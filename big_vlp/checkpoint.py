"""Orbax checkpoints holding everything needed to continue a run exactly.

Each step directory holds two items: 'state' (params, optimizer state, step, rng) and
'meta' (JSON: examples consumed per process, model/data fingerprint). Saves are async;
orbax writes to a temporary directory and renames it when complete, so an interrupted
save never replaces the last good checkpoint.
"""

import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the project's item layout."""

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    # Bucket paths (gs://...) pass through; local ones are made absolute for orbax.
    base = workdir if "://" in workdir else os.path.abspath(workdir)
    self.directory = str(epath.Path(base) / "checkpoints")
    self.every = int(every)
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
    )

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints."""
    return list(self._mgr.all_steps())

  def should_save(self, step: int, total_steps: int) -> bool:
    """True on every `every` steps and on the final step."""
    return step == total_steps or (self.every > 0 and step % self.every == 0)

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an async save of state + meta at `step`."""
    self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta); shardings come from the abstract state's leaves."""
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_meta(self, step: int) -> dict[str, Any]:
    """Only the JSON metadata of a checkpoint."""
    out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def wait(self) -> None:
    """Blocks until pending async saves are durable."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    """Waits for saves and releases resources."""
    self._mgr.wait_until_finished()
    self._mgr.close()
