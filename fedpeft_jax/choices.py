"""The one form of an option check: a module that owns an option (its allowed values, its
combinations with other options) raises this ValueError, naming the config field first, and
`runner.validate` calls that same check, turning the error into a one-line config error."""

from __future__ import annotations

from typing import Any, Sequence


def one_of(field: str, value: Any, allowed: Sequence[str]) -> Any:
  """`value` if it is one of `allowed`, else ValueError("<field>: <value>; allowed: ...")."""
  if value not in allowed:
    raise ValueError(f"{field}: {value!r}; allowed: {', '.join(map(str, allowed))}")
  return value
