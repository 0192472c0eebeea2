"""Checkpoints: one orbax `CheckpointManager` for train state + data iterator + config.

This is the only module that imports orbax. A checkpoint step directory holds three items:
`state` (the sharded `TrainState` pytree), `data` (the grain iterator position, one JSON file
per process) and `config` (the resolved config as JSON). Saves are asynchronous and atomic:
orbax writes to a temporary directory and renames it when complete, so a run killed mid-save
never leaves a checkpoint that `latest_step` would pick up.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


class NoCheckpointError(FileNotFoundError):
  """Raised when a workdir has no checkpoint to restore from."""


def checkpoint_dir(workdir: str) -> epath.Path:
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
  """Restores state (with the shardings of `abstract_state`) and the iterator in place."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise NoCheckpointError(f"no checkpoint in {mngr.directory}")
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return step, restored["state"]


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
  """Writes the resolved config next to the checkpoints (process 0 only)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote into `workdir` (raises NoCheckpointError if absent)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise NoCheckpointError(
      f"{workdir!r} has no {CONFIG_FILE}: not a vdit workdir (train there first with "
      "`python -m vdit.main --config=... --workdir=...`)"
    )
  with open(path) as f:
    return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))


def _lists_to_tuples(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {k: _lists_to_tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_lists_to_tuples(v) for v in x)
  return x
