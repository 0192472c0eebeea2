"""Checkpoints: one orbax `CheckpointManager` for train state + data iterator + config.

This is the only module that imports orbax. A checkpoint step directory holds four items:
`state` (the sharded `TrainState` pytree), `data` (the grain iterator position, one JSON file
per process), `config` (the resolved config as JSON) and `checksum` (a 64-bit hash of every
state array, computed at save time). Saves are asynchronous and atomic:
orbax writes to a temporary directory and renames it when complete, so a run killed mid-save
never leaves a checkpoint that `latest_step` would pick up (leftover temporary directories are
deleted when the next manager opens the workdir).

Restoring works on any mesh and any number of hosts: the state is resharded to the shardings
of the target `abstract_state`. The data iterator position is per host; with the same host
count it is restored exactly, with a different one this module reads every old host's position
and the data pipeline re-derives this host's (`vdit.data.packing.remap_state`).

What is restored is verified (`restore`): the step must restore, every array be finite and
match its save-time checksum; a damaged checkpoint is skipped with a warning for the newest
intact one, and a state that fails the check is never saved (docs/failure_modes.md). The lock
against a second trainer and the config comparison on resume are in `vdit.workdir`.
"""

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vdit.data import packing

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"  # where the trainer moves checkpoints that failed the check
CONFIG_FILE = "config.json"
CHECKSUM = "checksum"  # the checkpoint item with the save-time hash of every state array


class NoCheckpointError(FileNotFoundError):
  """Raised when a workdir has no checkpoint to restore from."""


class WorkdirError(Exception):
  """A workdir that training must not use as it is (the message says why and what to do)."""


class DamagedCheckpointError(WorkdirError):
  """No checkpoint (or not the one asked for) passed the checks on restore."""


def checkpoint_dir(workdir: str) -> epath.Path:
  """workdir/checkpoints, absolute for local paths (orbax rejects relative ones)."""
  if "://" not in str(workdir):
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir) / CHECKPOINT_DIR


def manager(
  workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1, async_save: bool = True
) -> ocp.CheckpointManager:
  """The manager for `workdir/checkpoints`."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    save_interval_steps=save_interval_steps,
    enable_async_checkpointing=async_save,
    create=True,
    cleanup_tmp_directories=True,  # partial saves of a killed run
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir),
    options=options,
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
      CHECKSUM: ocp.JsonCheckpointHandler(),
    },
  )


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iterator: Any | None,
  config: ml_collections.ConfigDict,
  *,
  force: bool = False,
) -> bool:
  """Saves state, iterator position, config and the state's checksum at `step` (asynchronously).

  A state with a non-finite array is not saved (`FloatingPointError`): the checkpoints already
  written stay, so rotation never deletes a good one for a broken one.
  """
  hashes, finite = fingerprint(state)
  if bad := [k for k, ok in finite.items() if not ok]:
    raise FloatingPointError(
      f"not saving checkpoint {step}: non-finite values in {_some(bad)}; the checkpoints "
      f"already in {mngr.directory} are kept"
    )
  items = {
    "state": ocp.args.StandardSave(state),
    "config": ocp.args.JsonSave(config_to_dict(config)),
    CHECKSUM: ocp.args.JsonSave({"step": int(step), "leaves": hashes}),
  }
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(
  mngr: ocp.CheckpointManager,
  abstract_state: Any,
  data_iterator: Any | None,
  step: int | None = None,
  *,
  move_damaged: bool = False,
) -> tuple[int, Any]:
  """Restores a verified state (with the shardings of `abstract_state`) and the iterator in place.

  Verified means: orbax restores the step, the restored step counter is `step`, every array is
  finite and matches the hash written at save time (`fingerprint`). With `step=None` the newest
  checkpoint that passes is used; each newer one that fails is named with the reason in a
  warning and, with `move_damaged` (the trainer), moved to `workdir/damaged_checkpoints/` so
  that the next saves neither collide with it nor rotate a good checkpoint out for it. If none
  passes (or the given `step` fails), `DamagedCheckpointError` names every step tried and why,
  and nothing is moved.

  If the checkpoint was written by a different number of processes, the iterator position is
  re-derived from all hosts' saved positions (`packing.remap_state`) instead of read directly.
  """
  if step is not None:
    try:
      return step, _restore_verified(mngr, step, abstract_state, data_iterator)
    except _Damaged as e:
      raise DamagedCheckpointError(f"checkpoint {step} in {mngr.directory} is damaged: {e}") from e
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise NoCheckpointError(f"no checkpoint in {mngr.directory}")
  damaged: list[tuple[int, str]] = []
  for candidate in steps:
    try:
      state = _restore_verified(mngr, candidate, abstract_state, data_iterator)
    except _Damaged as e:
      damaged.append((candidate, str(e)))
      logging.warning("checkpoint %d in %s is damaged: %s", candidate, mngr.directory, e)
      continue
    if damaged:
      where = _move_damaged(mngr, [s for s, _ in damaged]) if move_damaged else None
      logging.warning(
        "resuming from checkpoint %d, the newest intact one in %s; skipped damaged %s%s",
        candidate,
        mngr.directory,
        "; ".join(f"checkpoint {s} ({why})" for s, why in damaged),
        f" (moved to {where})" if where else "",
      )
    return candidate, state
  raise DamagedCheckpointError(
    f"no intact checkpoint in {mngr.directory}: tried steps "
    + ", ".join(str(s) for s, _ in damaged)
    + " — "
    + "; ".join(f"{s}: {why}" for s, why in damaged)
    + ". Nothing was written; restore the checkpoints from a backup or train in a new --workdir"
  )


class _Damaged(Exception):
  """A checkpoint step that failed a check (the message says which and why)."""


def _restore_verified(mngr, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
  """The state of `step` after all checks (raises `_Damaged` with the reason)."""
  step_dir = mngr.directory / str(step)
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  has_checksum = (step_dir / CHECKSUM).exists()
  if has_checksum:
    items[CHECKSUM] = ocp.args.JsonRestore()
  data_items = {}
  remapped = None
  if data_iterator is not None:
    data_dir = step_dir / "data"
    try:
      saved_count = saved_process_count(data_dir)
    except ValueError as e:
      raise _Damaged(str(e)) from None
    count = jax.process_count()
    if saved_count is None:
      raise _Damaged("it has no data iterator position (no data/process_*-of-*.json)")
    if saved_count == count:
      data_items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:
      try:
        states = saved_data_states(data_dir)
        remapped = packing.remap_state(states, jax.process_index(), count)
      except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
        raise _Damaged(
          f"it was written by {saved_count} processes, this run has {count}: {_first_line(e)}"
        ) from None
      logging.warning(
        "checkpoint %d was written by %d processes, this run has %d: data position re-derived "
        "(no example lost; examples that hosts ahead of the slowest had emitted repeat)",
        step,
        saved_count,
        count,
      )
  restored = {}
  for what, args in (("state", items), ("data position", data_items)):
    if not args:
      continue
    try:
      restored.update(mngr.restore(step, args=ocp.args.Composite(**args)))
    except Exception as e:  # orbax, tensorstore, grain and json raise many kinds
      raise _Damaged(
        f"the {what} does not restore ({type(e).__name__}: {_first_line(e)})"
      ) from None
  state = restored["state"]
  problem = _state_problem(step, state, restored[CHECKSUM] if has_checksum else None)
  if jax.process_count() > 1:  # all hosts take the same decision (collectively)
    flags = multihost_utils.process_allgather(np.int32(problem is not None))
    if problem is None and flags.any():
      problem = "another host found it damaged"
  if problem is not None:
    raise _Damaged(problem)
  if not has_checksum:
    logging.warning(
      "checkpoint %d has no %s item (written before vdit saved checksums): checked only that it "
      "restores and is finite",
      step,
      CHECKSUM,
    )
  if remapped is not None:
    data_iterator.set_state(remapped)
  return state


def _state_problem(step: int, state: Any, checksum: Mapping | None) -> str | None:
  """Why a restored state is not the one saved at `step` (None: it is)."""
  hashes, finite = fingerprint(state)
  if bad := [k for k, ok in finite.items() if not ok]:
    return f"non-finite values in {_some(bad)}"
  if checksum is not None:
    saved = dict(checksum.get("leaves", {}))
    differ = sorted(k for k in hashes.keys() | saved.keys() if hashes.get(k) != saved.get(k))
    if differ:
      return (
        f"{len(differ)} of {len(hashes)} state arrays differ from their save-time checksum "
        f"({_some(differ)})"
      )
  restored_step = int(jax.device_get(state.step)) if hasattr(state, "step") else step
  if restored_step != step:
    return f"its state says step {restored_step}"
  return None


def _move_damaged(mngr: ocp.CheckpointManager, steps: Sequence[int]) -> epath.Path:
  """Moves the damaged `steps` out of the checkpoint directory (kept for inspection)."""
  target = mngr.directory.parent / DAMAGED_DIR
  if jax.process_index() == 0:
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
      dest, n = target / str(step), 1
      while dest.exists():
        dest, n = target / f"{step}.{n}", n + 1
      (mngr.directory / str(step)).rename(dest)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("vdit_move_damaged_checkpoints")
  mngr.reload()
  return target


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = (str(e).strip().splitlines() or [""])[0]
  text = text.split(" See full TensorStore details")[0]  # (followed by a bound method's repr)
  return text if len(text) <= limit else text[: limit - 1] + "…"


def _some(names: Sequence[str], n: int = 3) -> str:
  shown = ", ".join(names[:n])
  return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------
# The state's checksum: a hash of every array, the same on any mesh and host count.
# ---------------------------------------------------------------------------------------------
def fingerprint(state: Any) -> tuple[dict[str, str], dict[str, bool]]:
  """({path: 64-bit hash as hex}, {path: all finite}) for every array of `state`.

  The hash is two sums, modulo 2³², of each array's words (its bits as uint32) times odd
  weights that depend on the element's global index. A sum can be taken in parts: each host
  adds up the shards it holds (one copy of each) and the hosts' sums are added, so no host
  gathers the state and the hash is the same on any mesh and host count. Any single changed
  word changes it (odd weights are invertible modulo 2³²). Computed with numpy on the host
  copies of the shards (no compilation; orbax copies them to the host for saving anyway).
  """
  paths_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  names = [jax.tree_util.keystr(path) for path, _ in paths_leaves]
  hashes = np.zeros((len(names), 2), np.uint32)
  finite = np.ones(len(names), bool)
  for i, (_, leaf) in enumerate(paths_leaves):
    for piece, index, shape in _local_pieces(leaf):
      h, f = _piece_hash(piece, index, shape)
      hashes[i] += h  # uint32: wraps modulo 2³²
      finite[i] &= f
  if jax.process_count() > 1:
    hashes = multihost_utils.process_allgather(hashes).sum(axis=0, dtype=np.uint32)
    finite = multihost_utils.process_allgather(finite).all(axis=0)
  return (
    {k: f"{int(a):08x}{int(b):08x}" for k, (a, b) in zip(names, hashes, strict=True)},
    {k: bool(f) for k, f in zip(names, finite, strict=True)},
  )


def _local_pieces(leaf: Any) -> Iterator[tuple[np.ndarray, tuple, tuple[int, ...]]]:
  """(host copy, global index, global shape) of each shard of `leaf` this host owns."""
  if isinstance(leaf, jax.Array):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    for shard in leaf.addressable_shards:
      if shard.replica_id == 0:  # one copy of every shard over all hosts
        yield np.asarray(shard.data), shard.index, leaf.shape
  elif jax.process_index() == 0:  # a host value (the same on every host): counted once
    value = np.asarray(leaf)
    yield value, (), value.shape


def _piece_hash(piece: np.ndarray, index: tuple, shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
  """(uint32[2] partial hash, all finite) of the part `index` of an array of `shape`."""
  finite = bool(np.isfinite(piece).all()) if np.issubdtype(piece.dtype, np.inexact) else True
  piece = piece if piece.flags.c_contiguous else piece.copy()  # (keeps 0-d arrays 0-d)
  if piece.dtype.itemsize == 8:  # two words per element, as a trailing axis
    words = piece.view(np.uint32).reshape(*piece.shape, 2)
    shape, index = (*shape, 2), (*index, slice(0, 2))
  else:
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[piece.dtype.itemsize]
    words = piece.view(unsigned).astype(np.uint32)
  flat = np.zeros(words.shape, np.uint64)  # global row-major index of every element
  stride = 1
  for axis in reversed(range(words.ndim)):
    start = (index[axis].start or 0) if axis < len(index) else 0
    along = np.arange(start, start + words.shape[axis], dtype=np.uint64) * np.uint64(stride)
    flat += along.reshape([-1 if a == axis else 1 for a in range(words.ndim)])
    stride *= shape[axis]
  flat = (flat % np.uint64(2**32)).astype(np.uint32)
  mixed = words * np.uint32(0x85EBCA6B)
  mixed ^= mixed >> np.uint32(13)
  h1 = np.sum(words * (flat * np.uint32(2) + np.uint32(1)), dtype=np.uint32)
  h2 = np.sum(mixed * (flat * np.uint32(0x9E3779B1) | np.uint32(1)), dtype=np.uint32)
  return np.array([h1, h2], np.uint32), finite


# ---------------------------------------------------------------------------------------------
# The data iterator position across host counts.
# ---------------------------------------------------------------------------------------------
def reached_preemption(mngr: ocp.CheckpointManager, step: int) -> bool:
  """True on every process at the same `step` once any process got a preemption notice.

  Multi-process runs only (the JAX coordination service catches SIGTERM); False otherwise.
  """
  return mngr.reached_preemption(step)


_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def saved_process_count(data_dir: epath.Path) -> int | None:
  """How many processes wrote the `data` item of a checkpoint (None: no such item or files)."""
  if not data_dir.exists():
    return None
  counts = {int(m.group(2)) for p in data_dir.iterdir() if (m := _DATA_FILE.fullmatch(p.name))}
  if not counts:
    return None
  if len(counts) != 1:
    raise ValueError(f"{data_dir} holds iterator states of {sorted(counts)} processes")
  return counts.pop()


def saved_data_states(data_dir: epath.Path) -> list[dict]:
  """The per-process iterator states in a checkpoint's `data` item, ordered by process."""
  found = {}
  for path in data_dir.iterdir():
    if m := _DATA_FILE.fullmatch(path.name):
      found[(int(m.group(2)), int(m.group(1)))] = json.loads(path.read_text())
  counts = {count for count, _ in found}
  if len(counts) != 1 or sorted(i for _, i in found) != list(range(next(iter(counts)))):
    raise ValueError(f"{data_dir} holds iterator states {sorted(found)}; expected one per process")
  return [found[k] for k in sorted(found)]


def latest_step(workdir: str) -> int | None:
  path = checkpoint_dir(workdir)
  if not path.exists():
    return None
  with ocp.CheckpointManager(path) as mngr:
    return mngr.latest_step()


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """JSON-safe dict of a config (tuples become lists)."""
  return json.loads(config.to_json())


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config next to the checkpoints (process 0 only; local or gs://)."""
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(config.to_json(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote into `workdir` (raises NoCheckpointError if absent)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
    raise NoCheckpointError(f"{workdir!r} is a file, not a vdit workdir (a directory)")
  if not path.is_file():
    raise NoCheckpointError(
      f"{workdir!r} has no {CONFIG_FILE}: not a vdit workdir (train there first with "
      "`python -m vdit.main --config=... --workdir=...`)"
    )
  try:
    data = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise NoCheckpointError(f"{path} is damaged, not the JSON config a run writes ({e})") from None
  if not isinstance(data, dict):
    raise NoCheckpointError(f"{path} is damaged: holds a {type(data).__name__}, not a config")
  return ml_collections.ConfigDict(_lists_to_tuples(data))


def _lists_to_tuples(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {k: _lists_to_tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_lists_to_tuples(v) for v in x)
  return x
