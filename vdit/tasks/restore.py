"""The EMA params of a workdir's checkpoint, for any task (evaluation, reference classifiers)."""

from typing import Any

import ml_collections
from absl import logging
from jax.sharding import Mesh

from vdit import checkpointing, sharding, tasks, train_state


def ema_params(
  workdir: str,
  step: int | None = None,
  config: ml_collections.ConfigDict | None = None,
  mesh: Mesh | None = None,
) -> tuple[ml_collections.ConfigDict, int, Any]:
  """(config, step, EMA params) of the latest (or given) checkpoint, sharded over `mesh` as
  the run's rules say (default: a `data`-only mesh, i.e. replicated on every device).

  The model comes from the task (`vdit.tasks.get(config)`), so classifiers, DiT and VideoDiT
  workdirs all load. `config` defaults to the one the run wrote into `workdir`.
  """
  config = config or checkpointing.read_config(workdir)
  mngr = checkpointing.manager(workdir, max_to_keep=config.max_checkpoints)
  try:
    if mngr.latest_step() is None:
      raise checkpointing.NoCheckpointError(
        f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}; train first with "
        f"`python -m vdit.main --config=... --workdir={workdir}`"
      )
    mesh = mesh or sharding.make_mesh({"data": -1})
    rules = sharding.rules_from_config(config.sharding_rules)
    builder = train_state.build(config, mesh, rules, tasks.get(config))
    step, state = checkpointing.restore(mngr, builder.abstract, None, step)
  finally:
    mngr.close()
  logging.info("restored EMA params of step %d from %s", step, workdir)
  return config, int(step), state.ema_params
