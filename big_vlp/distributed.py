"""Joining a multi-process (multi-host) JAX run, from the config or the environment.

`config.distributed.{coordinator_address, num_processes, process_id, timeout_s, mode}`; the
environment variables BIG_VLP_COORDINATOR, BIG_VLP_NUM_PROCESSES, BIG_VLP_PROCESS_ID and
BIG_VLP_DISTRIBUTED (mode) fill in what the config leaves unset, so one config launches on
any number of hosts. mode:
  'auto'  initialise when a coordinator is given, or when the environment is one that
          `jax.distributed.initialize()` detects by itself (Cloud TPU pod workers, Slurm,
          Open MPI); otherwise run as a single process.
  'on'    always call `jax.distributed.initialize` (auto-detection fills unset fields).
  'off'   single process.
It must run before anything asks JAX for devices.
"""

import os
from typing import Any

import jax

from big_vlp.config_errors import check_choice, fail

MODES = ("auto", "on", "off")
# Variables that mark an environment jax.distributed.initialize() can configure by itself.
_CLUSTER_MARKERS = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS",
                    "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


def _setting(cfg: Any, field: str, env: str) -> Any:
  value = cfg.get(field) if cfg is not None else None
  if value in (None, ""):
    value = os.environ.get(env) or None
  return value


def _as_int(value: Any, field: str) -> int | None:
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    fail(f"distributed.{field}", value, "must be an integer")
  return None


def settings(config: Any) -> dict[str, Any]:
  """The resolved distributed settings (config first, then environment)."""
  cfg = config.get("distributed") if config is not None else None
  mode = _setting(cfg, "mode", "BIG_VLP_DISTRIBUTED") or "auto"
  check_choice("distributed.mode", mode, MODES)
  out = {
      "mode": mode,
      "coordinator_address": _setting(cfg, "coordinator_address", "BIG_VLP_COORDINATOR"),
      "num_processes": _as_int(_setting(cfg, "num_processes", "BIG_VLP_NUM_PROCESSES"),
                               "num_processes"),
      "process_id": _as_int(_setting(cfg, "process_id", "BIG_VLP_PROCESS_ID"), "process_id"),
      "timeout_s": _as_int((cfg.get("timeout_s") if cfg is not None else None) or 300,
                           "timeout_s"),
  }
  if out["coordinator_address"]:
    for field in ("num_processes", "process_id"):
      if out[field] is None:
        fail(f"distributed.{field}", None, "must be set (or BIG_VLP_"
             + ("NUM_PROCESSES" if field == "num_processes" else "PROCESS_ID")
             + ") when a coordinator address is given")
    if not 0 <= out["process_id"] < out["num_processes"]:
      fail("distributed.process_id", out["process_id"],
           f"must be in [0, num_processes={out['num_processes']})")
  return out


def initialize(config: Any) -> bool:
  """Joins the multi-process run if the config / environment describe one; True if it did."""
  s = settings(config)
  if s["mode"] == "off":
    return False
  explicit = bool(s["coordinator_address"])
  detected = any(os.environ.get(v) for v in _CLUSTER_MARKERS)
  if s["mode"] == "auto" and not explicit and not detected:
    return False
  kwargs: dict[str, Any] = {"initialization_timeout": s["timeout_s"]}
  if explicit:
    kwargs.update(coordinator_address=s["coordinator_address"],
                  num_processes=s["num_processes"], process_id=s["process_id"])
  jax.distributed.initialize(**kwargs)
  return True
