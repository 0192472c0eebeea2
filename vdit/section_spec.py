"""Typed config sections: one frozen dataclass states a section's keys, their types and defaults.

A config section (`config.diffusion`, `config.optimizer`, ...) is read through its spec with
`read(Spec, section, "diffusion")`: absent keys take the spec's default (so an older run's
config, saved before a key existed, still reads), a key the spec does not have or a value of the
wrong type is an error naming the key, the value and what was expected. Config files write a
section from the spec's defaults (`defaults(Spec, **changes)`), so each default is written once.
"""

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any


def _coerce(name: str, value: Any, kind: Any) -> Any:
  """`value` as the annotated type `kind`: bool, int, float, str, or a tuple of them
  (`tuple[float, ...]` or `tuple[float, float]`); other annotations pass the value through."""
  origin = typing.get_origin(kind)
  if origin is tuple:
    if not isinstance(value, list | tuple):
      raise ValueError(f"{name}={value!r} must be a tuple")
    args = typing.get_args(kind)
    if not args:
      return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(name, v, args[0]) for v in value)
    if len(args) != len(value):
      raise ValueError(f"{name}={tuple(value)!r} must have {len(args)} entries")
    return tuple(_coerce(name, v, a) for v, a in zip(value, args, strict=True))
  if kind is bool:
    if not isinstance(value, bool):
      raise ValueError(f"{name}={value!r} must be True or False")
    return value
  if kind is int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
      raise ValueError(f"{name}={value!r} must be an integer")
    return int(value)
  if kind is float:
    if isinstance(value, bool) or not isinstance(value, int | float):
      raise ValueError(f"{name}={value!r} must be a number")
    return float(value)
  if kind is str:
    if not isinstance(value, str):
      raise ValueError(f"{name}={value!r} must be a string")
    return value
  return value


def read(spec: type, section: Mapping[str, Any] | None, name: str):
  """`spec` (a dataclass) from a config section: defaults for absent keys, unknown keys and
  values of the wrong type are ValueErrors naming `name.key`."""
  given = dict(section.to_dict() if hasattr(section, "to_dict") else section or {})
  hints = typing.get_type_hints(spec)
  fields = {f.name for f in dataclasses.fields(spec)}
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"{name} has no key(s) {unknown}; expected a subset of {sorted(fields)}")
  return spec(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in given.items()})


def defaults(spec: type, **changes) -> dict[str, Any]:
  """The section a config file writes: the spec's defaults with `changes` (checked)."""
  return dataclasses.asdict(read(spec, changes, spec.__name__))
