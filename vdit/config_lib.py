"""Helpers for plain-Python configs (`configs/**/*.py` with `get_config(arg)`).

A config file is selected as `--config=configs/vdit/shapes.py:tiny,variant=S/2`; the part after
the colon is parsed by `parse_arg` into a `ConfigDict` of typed options with defaults.
"""

from typing import Any

import ml_collections


def _coerce(value: str, default: Any) -> Any:
  """Parses `value` to the type of `default` (bool/int/float/str)."""
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes", ""):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean for this option, got {value!r}")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `"tiny,variant=S/2"` into a ConfigDict over `defaults`.

  A bare word sets a boolean option to True. Unknown options are errors, naming the choices.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, sep, value = part.partition("=")
    if key not in defaults:
      raise ValueError(
        f"unknown config argument {key!r} in {arg!r}; expected one of {sorted(defaults)}"
      )
    if not sep and not isinstance(defaults[key], bool):
      raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
    out[key] = _coerce(value, defaults[key])
  out.lock()
  return out


def flags_parser(argv: list[str]) -> list[str]:
  """absl `flags_parser` that turns config errors (unknown keys, bad values) into one line.

  `--config.total_stepz=3` would otherwise end in a chained traceback from ml_collections.
  """
  import sys  # noqa: PLC0415

  from absl import flags  # noqa: PLC0415

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpfull to see the flags.")
  except (AttributeError, KeyError) as e:
    msg = str(e.args[0] if e.args else e).strip("'\"").replace("\\'", "'").replace("\\n", " ")
    sys.exit(f"error: unknown config key: {msg}")
  except (ValueError, TypeError) as e:
    sys.exit(f"error: bad config: {e}")
