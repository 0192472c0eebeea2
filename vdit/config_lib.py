"""Helpers for plain-Python configs (`configs/**/*.py` with `get_config(arg)`).

A config file is selected as `--config=configs/vdit/shapes.py:tiny,variant=S/2`; the part after
the colon is parsed by `parse_arg` into a `ConfigDict` of typed options with defaults.
"""

import importlib.util
import os
from typing import Any

import ml_collections

from vdit import section_spec, sharding, train_state


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


def absolute_path(path: str | None) -> str | None:
  """A local path made absolute, so that a config or meta.json that names it works from any
  working directory; None and URLs (gs://...) are kept as they are."""
  return path if not path or "://" in path else os.path.abspath(path)


def check_choice(name: str, value: Any, choices) -> None:
  """ValueError naming `value` and the choices unless it is one of them."""
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {sorted(choices)}")


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

  for spec in _config_file_specs(argv):
    problem = check_config_file(spec)
    if problem:
      sys.exit(f"error: {problem}")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpfull to see the flags.")
  except (AttributeError, KeyError) as e:
    msg = str(e.args[0] if e.args else e).strip("'\"").replace("\\'", "'").replace("\\n", " ")
    sys.exit(f"error: unknown config key: {msg}")
  except (ValueError, TypeError) as e:
    sys.exit(f"error: bad config: {e}")


def _config_file_specs(argv: list[str]) -> list[str]:
  """The values of `--config=...` / `--config ...` in a command line."""
  specs = []
  for i, a in enumerate(argv[1:], start=1):
    if a.startswith("--config="):
      specs.append(a.removeprefix("--config="))
    elif a == "--config" and i + 1 < len(argv):
      specs.append(argv[i + 1])
  return specs


def check_config_file(spec: str) -> str:
  """What is wrong with `--config=path.py[:arg]` in one line, or "" if it loads.

  Runs the file's `get_config(arg)` once, so a missing file, a syntax error, an unknown or bad
  argument and a `get_config` that raises are reported before absl's flag machinery wraps them
  in chained tracebacks.
  """
  path, sep, arg = spec.partition(":")
  if not path:
    return f"--config={spec!r} names no file; expected path/to/config.py[:arguments]"
  if not os.path.isfile(path):
    return f"config file {path!r} does not exist (--config={spec})"
  try:
    module = load_module(path)
  except SyntaxError as e:
    return f"config file {path!r} line {e.lineno}: {e.msg}"
  except Exception as e:  # noqa: BLE001 (any import-time failure of a user's file)
    return f"config file {path!r} failed to load: {type(e).__name__}: {e}"
  if not callable(getattr(module, "get_config", None)):
    return f"config file {path!r} has no get_config() function"
  try:
    module.get_config(*([arg] if sep else []))
  except (ValueError, KeyError, TypeError) as e:
    msg = str(e.args[0] if e.args else e)
    return f"bad config argument in --config={spec}: {msg}"
  except Exception as e:  # noqa: BLE001
    return f"config file {path!r}: get_config({arg!r}) raised {type(e).__name__}: {e}"
  return ""


# How a transformer config runs rather than what it computes: XLA attention, scanned blocks, no
# rematerialization, float32. A run overrides them: --config.model.attention_backend=splash, ...
RUNTIME = dict(attention_backend="xla", scan_layers=True, remat_policy="none", dtype="float32")


def trainer_config(
  *,
  tiny: bool,
  total_steps: int,
  lr: float,
  warmup_steps: int,
  ema_decay: float | None = None,
  weight_decay: float = 0.0,
) -> ml_collections.ConfigDict:
  """The sections every training config shares (run length, logging, checkpoints, optimizer,
  mesh); a config file adds `task`, `input` and `model` (and what its task needs)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = total_steps
  c.log_every_steps = 25 if tiny else 100
  c.checkpoint_every_steps = max(1, total_steps // 2) if tiny else 2_000
  c.max_checkpoints = 3
  c.max_nonfinite_in_a_row = 20  # abort after this many skipped (non-finite) updates in a row
  # A run of the same model whose EMA params start this one (fine-tuning, continuing a finished
  # run on a new schedule, a distilled student from its teacher); "" = fresh params.
  c.init_from = ""
  c.optimizer = section_spec.defaults(
    train_state.Optimizer,
    lr=lr,
    warmup_steps=warmup_steps,
    b2=0.99 if tiny else 0.999,
    weight_decay=weight_decay,
    ema_decay=ema_decay if ema_decay is not None else (0.99 if tiny else 0.9999),
  )
  c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
  c.sharding_rules = sharding.DEFAULT_RULES
  return c


def classifier_config(
  *, tiny: bool, total_steps: int, lr: float, warmup_steps: int
) -> ml_collections.ConfigDict:
  """`trainer_config` for the classification task (ViT, NaViT, ViViT): AdamW with weight decay
  1e-4, and top-1 over the validation split at the end (vdit/evaluators, docs/evaluation.md). A
  config file adds `input` and `model`."""
  c = trainer_config(
    tiny=tiny, total_steps=total_steps, lr=lr, warmup_steps=warmup_steps, weight_decay=1e-4
  )
  c.task = "classification"
  c.evals = dict(classification=dict(type="top1"))
  return c


def load_module(path: str):
  """The config file at `path` as a module (loaded by path: config files never depend on the
  working directory or on being a package)."""
  name = "vdit_config_" + os.path.basename(path).removesuffix(".py")
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None:
    raise FileNotFoundError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` → its `get_config(arg)`, as `--config=` loads it (the one loader
  of the tools, the tests and the config files that build on another)."""
  path, sep, arg = spec.partition(":")
  return load_module(path).get_config(*([arg] if sep else []))


def load_sibling(config_file: str, name: str, arg: str | None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file `name` in the directory of `config_file`."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  return load_module(path).get_config(arg)
