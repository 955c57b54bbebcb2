"""Whether a new config may continue the run already in a workdir.

Fields that decide the train state's shapes or meaning (the model, the loss, the
tokenizer's vocabulary, which parameters train, the optimizer's state layout) must match
the checkpoints' config; everything else (steps, learning rate, logging, evaluators, data
paths) may change on resume. `--config.allow_config_change=True` overrides the refusal for
changes the user knows to be shape-compatible.
"""

import json
import sys
from typing import Any, Mapping

import jax
from etils import epath
from jax.experimental import multihost_utils

from big_vlp.config_errors import ConfigError

# A key is state-defining when it is one of these or lies under one (dotted prefixes).
STATE_FIELDS = ("model", "loss", "tokenizer", "freeze", "optim.name", "optim.mu_dtype")
# Switches about the resume itself, never worth a note.
IGNORED_FIELDS = ("allow_config_change",)
ABSENT = "<absent>"
# Fields added after runs existed: an older config.json that lacks one meant this value.
ADDED_FIELD_DEFAULTS = {"model.image.matmul_dtype": "float32",
                        "model.text.matmul_dtype": "float32"}
ALLOW_FLAG = "--config.allow_config_change=True"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts as {'a.b.c': leaf}; lists and empty dicts are leaves."""
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old, new)} for every leaf that differs; ABSENT marks a missing side."""
  a, b = flatten(old), flatten(new)
  value = lambda tree, k: tree.get(k, ADDED_FIELD_DEFAULTS.get(k, ABSENT))
  return {k: (value(a, k), value(b, k))
          for k in sorted(set(a) | set(b)) if value(a, k) != value(b, k)}


def affects_state(key: str) -> bool:
  """True for keys whose change alters the train state's shapes or meaning."""
  return any(key == f or key.startswith(f + ".") for f in STATE_FIELDS)


def _show(value: Any) -> str:
  return ABSENT if value is ABSENT else repr(value)


def format_change(key: str, old: Any, new: Any) -> str:
  """One diff line: `model.image.width: 128 -> 256`."""
  return f"{key}: {_show(old)} -> {_show(new)}"


def check_resume(old: Mapping[str, Any], new: Mapping[str, Any], *, allow_change: bool = False,
                 where: str = "the workdir") -> tuple[list[str], list[str]]:
  """(state-defining diff lines, other changed keys); ConfigError on the former unless allowed."""
  diff = {k: v for k, v in config_diff(old, new).items() if k not in IGNORED_FIELDS}
  state = [format_change(k, *v) for k, v in diff.items() if affects_state(k)]
  other = [k for k in diff if not affects_state(k)]
  if state and not allow_change:
    raise ConfigError(
        f"{where} holds a run with a different config; these fields change the train "
        "state's shapes or meaning:\n  " + "\n  ".join(state) + "\nUse a new --workdir "
        f"for a new run, or set {ALLOW_FLAG} if the change is intentional and the "
        "checkpoint still fits the model.")
  return state, other


def config_as_json(config: Any) -> dict[str, Any]:
  """The config as config.json stores it (tuples as lists, unset fields as null)."""
  return json.loads(config.to_json_best_effort())


def check_workdir_config(config: Any, workdir: str, *, has_checkpoint: bool,
                         is_main: bool) -> str | None:
  """Refuses a config the checkpoints here do not fit; returns config.json's old text or None."""
  path = epath.Path(workdir) / "config.json"
  if not (has_checkpoint and path.exists()):
    return None
  old_text = path.read_text()
  try:
    old = json.loads(old_text)
  except ValueError as e:  # A write cut short; nothing to compare against.
    if is_main:
      print(f"warning: {path} is unreadable ({e}); not checking the config against the "
            "checkpoints' one", file=sys.stderr, flush=True)
    return old_text
  state, other = check_resume(old, config_as_json(config), where=f"workdir {workdir}",
                              allow_change=bool(config.get("allow_config_change", False)))
  if is_main and state:
    print("warning: continuing with changed state-defining fields (allow_config_change):"
          "\n  " + "\n  ".join(state), file=sys.stderr, flush=True)
  if is_main and other:
    print("note: config fields changed since the previous invocation: " + ", ".join(other),
          flush=True)
  return old_text


def record_config(config: Any, workdir: str, previous: str | None, *, is_main: bool) -> None:
  """Writes config.json, keeping a different `previous` one as config.prev.json."""
  # Called once the state is restored, so a config the checkpoint turned out not to fit
  # is never recorded as the run's.
  _barrier("big_vlp_config_checked")  # Every process has read the old config.json.
  if not is_main:
    return
  text = config.to_json_best_effort(indent=2)
  if previous is not None and previous != text:
    (epath.Path(workdir) / "config.prev.json").write_text(previous)
  (epath.Path(workdir) / "config.json").write_text(text)  # The exact config, for the record.


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
