"""The workdir of a training run: one trainer at a time, and a resume only with a compatible
config (docs/failure_modes.md).

`check_workdir` refuses an empty path before any compute; `workdir_lock` holds an OS lock
that a crashed run cannot leave behind; `check_config_unchanged` compares the config with the
one the workdir's checkpoints were written with and names every key that must not change.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from vdit import checkpointing
from vdit.checkpointing import WorkdirError
from vdit.data import pipeline

LOCK_FILE = "vdit.lock"


class WorkdirLockedError(WorkdirError):
  """Another run holds the workdir's lock."""


class ConfigChangedError(WorkdirError):
  """The config differs from the one the workdir's checkpoints were written with."""


def check_workdir(workdir: str | None) -> None:
  """Refuses an empty workdir (`--workdir=` would train into the current directory)."""
  if workdir is None or not str(workdir).strip():
    raise WorkdirError(
      f"--workdir is empty ({workdir!r}): pass the directory for checkpoints, logs and "
      "samples, e.g. --workdir=runs/shapes"
    )


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` (process 0 only), or raises `WorkdirLockedError`.

  `fcntl.flock` on `workdir/vdit.lock`: the OS releases it when the holder exits in any way,
  kill -9 included, so a crashed run never leaves the workdir locked. The file (kept, never
  deleted: deleting a lock file races with the next locker) names the holder. Only process 0
  of a multi-host run takes it: the other hosts of the same run share the workdir. Workdirs on
  object stores (gs://) are not locked.
  """
  if jax.process_index() != 0 or "://" in str(workdir):
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except (FileExistsError, NotADirectoryError):
    raise WorkdirError(f"--workdir {workdir!r} is not a directory") from None
  except OSError as e:
    raise WorkdirError(f"cannot use --workdir {workdir!r}: {e.strerror} ({path})") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "holder unknown"
      raise WorkdirLockedError(
        f"workdir {workdir!r} is in use by another training run ({holder}); wait for it to "
        f"finish or use another --workdir (the lock {path} is released when that process exits)"
      ) from None
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {since}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


# Keys that a resumed run may change: they do not change what the saved state and data position
# mean (run length, logging, evaluation, sampling, where and how fast data is read, the layout
# of the state on devices). Everything else (the model, the data stream, the seed, the diffusion
# objective, the optimizer) must match the checkpoint, or be named in `allow`.
SAFE_TO_CHANGE = (
  "total_steps",
  "log_every_steps",
  "checkpoint_every_steps",
  "max_checkpoints",
  "max_nonfinite_in_a_row",
  "evals",
  "sample",
  "mesh",
  "sharding_rules",
  "aot_topology",
  "input.data_dir",
  "input.read_threads",
  "input.read_buffer",
  "input.prefetch_batches",
  "model.attention_backend",
  "model.remat_policy",
)

# Keys vdit no longer has -> the saved value that meant what vdit does now: a checkpoint written
# with that value resumes (the key is dropped); any other saved value is a change, refused.
REMOVED_KEYS = {f"input.{k}": v for k, v in pipeline.REMOVED_KEYS.items()}


def check_config_unchanged(
  workdir: str, config: ml_collections.ConfigDict, allow: Sequence[str] = ()
) -> None:
  """Raises `ConfigChangedError` naming every key (old → new) that a resume must not change.

  Compares `config` with the one the workdir's checkpoints were written with (`config.json`,
  else the newest step's `config` item). A workdir without checkpoints passes.
  """
  steps = _step_dirs(workdir)
  if not steps:
    return
  saved = _saved_config(workdir, steps)
  if saved is None:
    logging.warning(
      "%s has checkpoints but no readable config (%s): cannot compare configs",
      workdir,
      checkpointing.CONFIG_FILE,
    )
    return
  new = _flatten(checkpointing.config_to_dict(config))
  old = {k: v for k, v in _flatten(saved).items() if REMOVED_KEYS.get(k, _ABSENT) != v}
  keys = sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))
  # A key the saved config lacks was added to vdit after it was written; new keys default to
  # the behaviour before them, so they are reported, not refused.
  added = [k for k in keys if k not in old]
  if added:
    logging.warning(
      "config keys added since %s was written (assumed to keep the old behaviour): %s",
      workdir,
      ", ".join(f"{k}={_show(new[k])}" for k in added),
    )
  keys = [k for k in keys if k in old]
  safe = (*SAFE_TO_CHANGE, *allow)
  refused = [k for k in keys if not any(k == p or k.startswith(p + ".") for p in safe)]
  if keys and not refused:
    logging.info("resuming with changed %s", ", ".join(keys))
  if refused:
    changes = ", ".join(
      f"{k}: {_show(old.get(k, _ABSENT))} → {_show(new.get(k, _ABSENT))}" for k in refused
    )
    raise ConfigChangedError(
      f"workdir {workdir!r} holds checkpoints of another config; these keys differ (saved → "
      f"now): {changes}. Resume with the saved values, train in a new --workdir, or pass "
      f"--allow_config_change={','.join(refused)} if the change is intended"
    )


_ABSENT = object()


def _step_dirs(workdir: str) -> list[int]:
  """The finished checkpoint steps in `workdir` (newest first), without opening a manager."""
  path = checkpointing.checkpoint_dir(workdir)
  if not path.exists():
    return []
  return sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()), reverse=True)


def _saved_config(workdir: str, steps: Sequence[int]) -> dict | None:
  candidates = [epath.Path(workdir) / checkpointing.CONFIG_FILE]
  steps_dir = checkpointing.checkpoint_dir(workdir)
  candidates += [steps_dir / str(s) / "config" / "metadata" for s in steps]
  for path in candidates:
    try:
      saved = json.loads(path.read_text())
    except (OSError, ValueError):
      continue
    if isinstance(saved, dict):
      return saved
  return None


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping) and v:
      flat.update(_flatten(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def _show(value: Any, limit: int = 60) -> str:
  text = "(absent)" if value is _ABSENT else json.dumps(value)
  return text if len(text) <= limit else text[: limit - 1] + "…"
