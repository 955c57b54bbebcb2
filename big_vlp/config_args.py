"""Parses `get_config(arg)` strings such as 'loss=softmax,steps=500,runlocal'."""

from typing import Any

import ml_collections

from big_vlp.config_errors import ConfigError


def _convert(key: str, raw: str, default: Any) -> Any:
  if isinstance(default, bool):
    if raw.lower() in ("", "1", "true", "yes"):
      return True
    if raw.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"config argument {key}={raw!r} must be a boolean (true/false)")
  if default is None or isinstance(default, str):
    return raw
  try:
    return type(default)(raw)
  except ValueError:
    raise ConfigError(f"config argument {key}={raw!r} must be of type "
                      f"{type(default).__name__}") from None


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'k=v,flag' -> ConfigDict over `defaults`; types follow the defaults; a bare key is True."""
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, _, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r}; allowed: {', '.join(defaults)}")
    if "=" in item:
      out[key] = _convert(key, raw.strip(), defaults[key])
    elif isinstance(defaults[key], bool):
      out[key] = True
    else:
      raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
  return ml_collections.ConfigDict(out)


def split_arg(arg: str | None, keys: tuple[str, ...]) -> tuple[str, str]:
  """Splits 'k=v,...' into (the items whose key is in `keys`, the others), both as strings;
  a recipe config parses its own keys and passes the rest to the config it builds on."""
  own, rest = [], []
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    (own if item.partition("=")[0].strip() in keys else rest).append(item)
  return ",".join(own), ",".join(rest)
