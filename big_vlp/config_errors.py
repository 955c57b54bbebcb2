"""Start-up config validation errors that name the field, the value and what is allowed."""

from typing import Any, Iterable


class ConfigError(ValueError):
  """A config field holds a value the run cannot use."""


def check_choice(field: str, value: Any, allowed: Iterable[Any]) -> Any:
  """Returns `value` if it is one of `allowed`, else raises ConfigError naming the field."""
  allowed = list(allowed)
  if value not in allowed:
    raise ConfigError(
        f"config.{field}={value!r} is not valid; allowed values: "
        + ", ".join(repr(a) for a in allowed))
  return value


def fail(field: str, value: Any, why: str) -> None:
  """Raises ConfigError for `field` with an explanation."""
  raise ConfigError(f"config.{field}={value!r}: {why}")
