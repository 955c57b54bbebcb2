"""Metrics to WORKDIR/metrics.jsonl (one JSON object per event, always with 'step'),
TensorBoard event files, and a progress line on the console."""

import json
import math
import sys
import time
from typing import Any, Mapping

from etils import epath


def _jsonable(v: Any) -> Any:
  v = float(v) if hasattr(v, "__float__") else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; keep them visible instead of invalid output.
  return v


class MetricWriter:
  """Appends metric events; only the main process writes. The workdir may be local or a
  bucket path such as gs://... (epath)."""

  def __init__(self, workdir: str, *, is_main: bool = True, tensorboard: bool = True):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.is_main = is_main
    self._tb = None
    if is_main:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
          self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
        except Exception as e:  # pylint: disable=broad-except
          print(f"warning: no TensorBoard files ({type(e).__name__}: {e}); metrics.jsonl "
                "is still written", file=sys.stderr)

  def truncate_after(self, step: int) -> None:
    """Drops events logged after `step` (work lost by a crash that is now being redone)."""
    if not self.is_main or not self.path.exists():
      return
    kept = []
    with self.path.open() as f:
      for line in f:
        try:
          if json.loads(line).get("step", 0) <= step:
            kept.append(line)
        except json.JSONDecodeError:
          pass  # A line cut short by a kill.
    tmp = self.path.parent / (self.path.name + ".tmp")
    with tmp.open("w") as f:
      f.writelines(kept)
    tmp.replace(self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one event."""
    if not self.is_main:
      return
    event = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(event) + "\n")
    if self._tb is not None:
      for k, v in event.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    """Flushes TensorBoard."""
    if self._tb is not None:
      self._tb.close()


def format_duration(seconds: float) -> str:
  """'1h02m', '3m05s' or '12s'."""
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """Tracks throughput and ETA and prints a one-line progress display."""

  def __init__(self, total_steps: int, start_step: int, global_batch: int,
               is_main: bool = True):
    self.total = total_steps
    self.batch = global_batch
    self.is_main = is_main
    self._t0 = time.perf_counter()
    self._last_t = self._t0
    self._last_step = start_step
    self._start_step = start_step

  def restart(self, step: int) -> None:
    """Measures throughput from now and `step` on (e.g. after compilation)."""
    self._last_t, self._last_step = time.perf_counter(), step

  def exclude(self, seconds: float) -> None:
    """Leaves time spent outside training steps (evaluation, saving) out of throughput."""
    self._last_t += seconds

  def measure(self, step: int) -> dict[str, float]:
    """Throughput since the last call and the ETA for the remaining steps."""
    now = time.perf_counter()
    if step <= self._last_step:  # Empty window (e.g. right after compilation): no rate.
      return {"elapsed_s": now - self._t0}
    steps = step - self._last_step
    dt = max(now - self._last_t, 1e-9)
    self._last_t, self._last_step = now, step
    step_time = dt / steps
    return {"step_time_s": step_time, "img_per_sec": self.batch / step_time,
            "eta_s": step_time * (self.total - step),
            "elapsed_s": now - self._t0, "window_s": dt}

  def show(self, step: int, metrics: Mapping[str, float]) -> None:
    """Prints '[####....]  37% step 370/1000 loss ... img/s ... ETA ...'."""
    if not self.is_main:
      return
    frac = step / max(self.total, 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    parts = [f"[{bar}] {100 * frac:5.1f}% step {step}/{self.total}"]
    for key in ("loss", "lr", "temperature", "bias"):
      if f"train/{key}" in metrics:
        parts.append(f"{key} {metrics[f'train/{key}']:.4g}")
    if "train/img_per_sec" in metrics:
      parts.append(f"{metrics['train/img_per_sec']:.0f} img/s")
    if "train/mfu" in metrics:
      parts.append(f"MFU {100 * metrics['train/mfu']:.1f}%")
    if "train/eta_s" in metrics:
      parts.append(f"ETA {format_duration(metrics['train/eta_s'])}")
    print("  ".join(parts), file=sys.stdout, flush=True)
