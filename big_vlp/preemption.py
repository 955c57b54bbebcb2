"""Stop requests: SIGTERM / SIGINT (what Cloud TPU and batch schedulers send before taking
the machine) and, in multi-host runs, JAX's preemption notice, on which all hosts agree.

The trainer asks `requested(step)` after every step; when it says yes the trainer saves a
checkpoint at that step, waits until it is durable and raises `Preempted`, which the CLI
turns into exit status EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again"). Running the same
command again continues the run exactly.
"""

import signal
import sys
import threading
from typing import Any

import jax

EXIT_PREEMPTED = 75


class Preempted(Exception):
  """Training stopped on request after saving a checkpoint at `step`."""

  def __init__(self, step: int, signum: int | None):
    name = signal.Signals(signum).name if signum else "a preemption notice"
    super().__init__(f"stopped by {name} after step {step}; checkpoint {step} saved. Run "
                     "the same command again to continue.")
    self.step = step


class StopRequests:
  """Watches for a stop request during training (use as a context manager)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    self._multihost = jax.process_count() > 1

  def __enter__(self) -> "StopRequests":
    # Multi-host: JAX's coordination service owns SIGTERM and tells every host (below).
    signals = (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
      for s in signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now, without the checkpoint.
    self.signum = signum
    print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
          "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

  def requested(self, step: int) -> bool:
    """True (on every process at the same step) when training should stop after `step`."""
    if self._multihost:
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except RuntimeError:  # No preemption service (jax.distributed not initialised).
        pass
    return self.signum is not None
