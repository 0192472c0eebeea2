"""Checkpoints: one orbax `CheckpointManager` for train state + data iterator + config.

This is the only module that imports orbax. A checkpoint step directory holds three items:
`state` (the sharded `TrainState` pytree), `data` (the grain iterator position, one JSON file
per process) and `config` (the resolved config as JSON). Saves are asynchronous and atomic:
orbax writes to a temporary directory and renames it when complete, so a run killed mid-save
never leaves a checkpoint that `latest_step` would pick up (leftover temporary directories are
deleted when the next manager opens the workdir).

Restoring works on any mesh and any number of hosts: the state is resharded to the shardings
of the target `abstract_state`. The data iterator position is per host; with the same host
count it is restored exactly, with a different one it is re-derived (`remap_data_state`).
"""

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


class NoCheckpointError(FileNotFoundError):
  """Raised when a workdir has no checkpoint to restore from."""


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
  """Saves state, iterator position and config at `step` (asynchronously)."""
  items = {
    "state": ocp.args.StandardSave(state),
    "config": ocp.args.JsonSave(config_to_dict(config)),
  }
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(
  mngr: ocp.CheckpointManager,
  abstract_state: Any,
  data_iterator: Any | None,
  step: int | None = None,
) -> tuple[int, Any]:
  """Restores state (with the shardings of `abstract_state`) and the iterator in place.

  If the checkpoint was written by a different number of processes, the iterator position is
  re-derived from all hosts' saved positions (`remap_data_state`) instead of read directly.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise NoCheckpointError(f"no checkpoint in {mngr.directory}")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  remapped = None
  if data_iterator is not None:
    data_dir = mngr.directory / str(step) / "data"
    saved_count = saved_process_count(data_dir)
    count = jax.process_count()
    if saved_count is None:
      raise NoCheckpointError(f"checkpoint {step} in {mngr.directory} has no data position")
    if saved_count == count:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:
      try:
        remapped = remap_data_state(saved_data_states(data_dir), jax.process_index(), count)
      except ValueError as e:
        raise ValueError(
          f"checkpoint {step} was written by {saved_count} processes, this run has {count}: {e}"
        ) from None
      logging.warning(
        "checkpoint %d was written by %d processes, this run has %d: data position re-derived "
        "(no example skipped; examples already seen by hosts that were ahead repeat)",
        step,
        saved_count,
        count,
      )
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  if remapped is not None:
    data_iterator.set_state(remapped)
  return step, restored["state"]


def reached_preemption(mngr: ocp.CheckpointManager, step: int) -> bool:
  """True on every process at the same `step` once any process got a preemption notice.

  Multi-process runs only (the JAX coordination service catches SIGTERM); False otherwise.
  """
  return mngr.reached_preemption(step)


# ---------------------------------------------------------------------------------------------
# The data iterator position across host counts.
# ---------------------------------------------------------------------------------------------
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def saved_process_count(data_dir: epath.Path) -> int | None:
  """How many processes wrote the `data` item of a checkpoint (None: no such item)."""
  if not data_dir.exists():
    return None
  counts = {int(m.group(2)) for p in data_dir.iterdir() if (m := _DATA_FILE.fullmatch(p.name))}
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


def remap_data_state(states: Sequence[dict], process_index: int, process_count: int) -> dict:
  """The iterator state for host `process_index` of `process_count`, from all old hosts' states.

  The pipeline (`vdit/data/pipeline.py`) gives host i of n the global examples i, i+n, i+2n, ...
  and grain's packer saves `parent.next_index`: the host-local index of the first example of
  the packing window being emitted (everything before it was emitted). Host i has therefore
  emitted every global example below i + n·next_index_i, and all hosts together every example
  below g = min_i(i + n·next_index_i). The new host i' starts at its first example ≥ g, with a
  fresh packing window. No example is skipped; examples ≥ g that some old host had already
  emitted are seen again (at most the old hosts' lead over the slowest one plus one packing
  window each). Only the plain packed pipeline (`input.workers=0`) has this state layout.
  """
  n = len(states)
  starts = []
  for i, state in enumerate(states):
    if set(state) != {"parent", "next_row", "counter"} or set(state["parent"]) != {"next_index"}:
      raise ValueError(
        f"cannot re-derive the data position for {process_count} hosts from the {n} hosts' "
        f"iterator states (layout {sorted(state)}; expected grain's packing state over a "
        "MapDataset, i.e. input.workers=0). Resume with the same number of hosts."
      )
    starts.append(i + n * int(state["parent"]["next_index"]))
  first_unseen = min(starts)
  next_index = max(0, math.ceil((first_unseen - process_index) / process_count))
  return {"parent": {"next_index": next_index}, "next_row": 0, "counter": 0}


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
  if not path.exists():
    raise NoCheckpointError(
      f"{workdir!r} has no {CONFIG_FILE}: not a vdit workdir (train there first with "
      "`python -m vdit.main --config=... --workdir=...`)"
    )
  return ml_collections.ConfigDict(_lists_to_tuples(json.loads(path.read_text())))


def _lists_to_tuples(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {k: _lists_to_tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_lists_to_tuples(v) for v in x)
  return x
